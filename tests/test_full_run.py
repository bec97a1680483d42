"""The full run on the tiny model on the CPU: stopped and continued from its checkpoint, adapter and merged model
saved and loadable, samples before and after, pushed to a stand-in for the Hugging Face Hub (tests/hub_server.py);
the same from the rendered notebook on a real kernel; every failure a user can cause in one line."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner
from hub_server import FakeHub
from test_notebook import STORES, cell_values, kernel, parameters, run_cells, text_of  # noqa: F401  (kernel: a fixture)

from sweeper.cli import cli

STOP_AFTER_ONE_STEP = "0.01"  # SWEEPER_DEADLINE_HOURS: 36 s left is inside the 5-minute margin: stop at the first step
STOPPED = re.compile(r"Error: the session deadline is \d+ min away: stopped at (\S+); run the full run again to "
                     r"continue from there")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread here and in the kernels: a tiny model gains nothing from two, and on a busy machine two
    threads wait on each other (generation measured 50x slower at a load average of 15 on 2 cores)."""
    import os

    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="module")
def best_study(tmp_path_factory) -> tuple[str, Path]:
    """(store URL, the tiny model's folder): the demo sweep on 200 examples, with one real trial complete."""
    from runner import run_worker
    from runner.demo import prepare_demo, write_dataset
    from sweeper.spec import load_spec
    from sweeper.storage import open_store
    from sweeper.study import create_study, enqueue

    folder = tmp_path_factory.mktemp("full-run")
    sweep = prepare_demo(folder / "demo", n_trials=1)
    write_dataset(folder / "demo" / "data.jsonl", n=200)  # one epoch: 2 steps of the best batch size
    sweep.write_text(sweep.read_text().replace("train_tokens = 60_000", "train_tokens = 2_000")
                     .replace("evals = 4", "evals = 1").replace("eval_examples = 64", "eval_examples = 16"))
    store = f"sqlite:///{folder / 'sweeps.db'}"
    opened = open_store(store, create=True)
    optuna_study, _ = create_study(load_spec(sweep), opened)
    enqueue(optuna_study, opened, [{"learning_rate": 3e-3, "batch_size": 16}])  # a known best: 2 steps an epoch
    run_worker(store, "demo", checkpoint_root=str(folder / "ck"), account="t", log=lambda line: None)
    return store, folder / "demo" / "tiny-llama"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub, reached through HF_ENDPOINT (this process: huggingface_hub read it at import already)."""
    import huggingface_hub.constants as constants

    with FakeHub() as fake:
        for name, value in {"HF_ENDPOINT": fake.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.delenv("SWEEPER_DEADLINE_HOURS", raising=False)
        yield fake


def files_of(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def assert_pushed_is_merged(repo: dict, out: Path) -> None:
    """The Hub repo holds the merged model's files, byte for byte."""
    assert {name: hashlib.sha256(data).hexdigest() for name, data in repo["files"].items()} == files_of(out / "merged")


def stopped_after_one_step(args: list[str], monkeypatch) -> tuple:
    """`sweeper full-run ARGS` stopped by its deadline after one step: (the result, the STOPPED line's match)."""
    monkeypatch.setenv("SWEEPER_DEADLINE_HOURS", STOP_AFTER_ONE_STEP)
    first = CliRunner().invoke(cli, args)
    stopped = STOPPED.fullmatch(first.stderr.strip().splitlines()[-1])
    assert first.exit_code == 1 and stopped, first.output
    return first, stopped


def run_again(args: list[str], prompts: str, tmp_path: Path, monkeypatch) -> tuple:
    """`sweeper full-run ARGS` run again without a deadline, sampling `prompts` (a line each): (the result, its JSON)."""
    monkeypatch.delenv("SWEEPER_DEADLINE_HOURS")
    path = tmp_path / "prompts.txt"
    path.write_text(prompts)
    again = CliRunner().invoke(cli, [*args, "--prompts", str(path)])
    assert again.exit_code == 0, again.output
    return again, json.loads(again.stdout)


def assert_merged_is_base_plus_adapter(out: Path, model_dir: Path) -> None:
    """The merged model loads with transformers and computes what the base with the adapter (peft) computes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out / "merged")("in the garden, bob has 3 keys", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
        with with_adapter.disable_adapter():
            assert not torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)


def test_a_stopped_full_run_continues_from_its_checkpoint_then_merges_samples_and_pushes(best_study, hub, tmp_path,
                                                                                         monkeypatch):
    store, model_dir = best_study
    out = tmp_path / "full"
    token = hub.add_token("alice")
    monkeypatch.setenv("HF_TOKEN", token)
    args = ["full-run", "--store", store, "--out", str(out), "--checkpoint-every", "1", "--push-to", "alice/tiny-full"]

    first, stopped = stopped_after_one_step(args, monkeypatch)
    assert stopped.group(1) == str(out / "checkpoints" / "step-000001")
    assert not (out / "merged").exists() and hub.repos["alice/tiny-full"]["files"] == {}  # the repo is made up front

    second, done = run_again(args, "in the garden, bob has 3 keys and\n\nin the tower, judy has\n", tmp_path,
                             monkeypatch)
    assert done["resumed_from_step"] == 1 and done["steps"] == 2  # continued, not restarted
    assert f"resuming from {out / 'checkpoints' / 'step-000001'} (step 1/2)" in second.stderr
    assert "trained 2 steps (continued from step 1): eval loss" in second.stderr
    assert second.stderr.count("\n  before: ") == 2 and second.stderr.count("\n  after:  ") == 2
    samples = json.loads((out / "generations.json").read_text())
    assert [g["prompt"] for g in samples] == ["in the garden, bob has 3 keys and", "in the tower, judy has"]
    assert all(g["before"] and g["after"] for g in samples)
    assert_merged_is_base_plus_adapter(out, model_dir)

    repo = hub.repos["alice/tiny-full"]
    assert repo["private"] and repo["commits"] == ["sweeper full run of study demo, best trial #0"]
    assert_pushed_is_merged(repo, out)
    assert "model.safetensors" in repo["files"] and done["pushed"] == f"{hub.url}/alice/tiny-full"
    assert token not in first.output + second.output


def test_a_killed_full_run_continues_from_its_last_checkpoint(best_study, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    store, _ = best_study
    out = tmp_path / "full"
    args = ["full-run", "--store", store, "--out", str(out), "--epochs", "3", "--checkpoint-every", "1"]
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a full pipe nobody reads would block the child
    with log.open("wb") as stderr:
        run = subprocess.Popen([sys.executable, "-c", "from sweeper.cli import main; main()", *args],
                               stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "checkpoints" / "step-000001" / "trainer_state.json"
    hang_guard = time.monotonic() + 600  # fails a hung child instead of hanging CI; no timing is asserted
    while not first.exists() and run.poll() is None and time.monotonic() < hang_guard:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)  # no checkpoint on the way out: the VM is gone
    run.wait()
    assert first.exists(), log.read_text()

    again = CliRunner().invoke(cli, args)

    assert again.exit_code == 0, again.output
    done = json.loads(again.stdout)
    assert done["resumed_from_step"] >= 1 and done["steps"] == 6  # continued from what the killed run last wrote
    assert f"(step {done['resumed_from_step']}/6)" in again.stderr and (out / "merged" / "model.safetensors").is_file()


def test_a_stopped_full_run_continues_its_own_config_after_the_studys_best_moves(best_study, tmp_path, monkeypatch):
    import shutil

    import optuna

    from sweeper.storage import open_store
    from sweeper.study import load_study

    db = tmp_path / "sweeps.db"  # a copy: the other tests keep trial #0 as the best
    shutil.copy(best_study[0].removeprefix("sqlite:///"), db)
    store, out = f"sqlite:///{db}", tmp_path / "full"
    args = ["full-run", "--store", store, "--out", str(out), "--checkpoint-every", "1"]
    stopped_after_one_step(args, monkeypatch)

    study, _ = load_study(open_store(store), "demo")
    (best,) = study.get_trials()
    study.add_trial(optuna.trial.create_trial(params={**best.params, "learning_rate": 1e-3},
                                              distributions=best.distributions, value=best.value / 2))
    again, done = run_again(args, "in the garden, bob has\n", tmp_path, monkeypatch)

    assert (done["best_trial"], done["resumed_from_step"], done["steps"]) == (0, 1, 2)
    assert "full run of study 'demo': best trial #0, learning rate 0.003, batch size 16" in again.stderr
    assert "the study's best has moved since this full run started: now trial #1 (eval loss " in again.stderr
    assert json.loads((out / "full_run.json").read_text())["params"]["learning_rate"] == 3e-3


def test_sample_prompts_of_chat_data_are_the_tokens_training_fed_the_model(best_study, tmp_path):
    import shutil
    import tomllib

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from runner import data as D
    from runner.demo import SPEC
    from runner.full_run import eval_prompts, prompt_inputs, sample_prompt
    from sweeper.spec import spec_from_dict

    model = shutil.copytree(best_study[1], tmp_path / "chat-model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    special = tokenizer.eos_token  # a chat template made of special tokens, and a BOS the tokenizer adds: as Llama 3's
    tokenizer.chat_template = f"{{% for m in messages %}}{special}user: {{{{ m['content'] }}}}{{% endfor %}}{special}"
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{special} $A",
                                                             special_tokens=[(special, tokenizer.eos_token_id)])
    tokenizer.save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"q": f"how many keys has {name}?", "a": f"{name} has {i} keys."}) + "\n"
                            for i, name in enumerate(["alice", "bob", "carol", "dave", "erin"] * 4)))
    spec = tomllib.loads(SPEC.format(n_trials=1, model=model, data=data))
    spec["data"].update(prompt_field="q", response_field="a", eval_examples=4)
    spec = spec_from_dict(spec)

    def trained_prompt(doc):
        return [t for t, label in zip(doc.input_ids, doc.labels) if label == D.IGNORE]

    tokenizer, _, held_out = D.documents(spec)
    shown = [prompt_inputs(tokenizer, p, chat=True)["input_ids"][0].tolist()
             for p in eval_prompts(tokenizer, held_out, spec)]
    assert shown == [trained_prompt(doc) for doc in held_out[:3]] and shown[0][0] == tokenizer.eos_token_id
    (doc,) = D.tokenize([{"q": "how many keys has judy?", "a": "none."}], tokenizer, spec.data, 128)
    given = sample_prompt("how many keys has judy?", spec, tokenizer)
    assert prompt_inputs(tokenizer, given, chat=True)["input_ids"][0].tolist() == trained_prompt(doc)


@pytest.fixture
def empty_study(best_study, tmp_path) -> str:
    from runner.demo import SPEC
    from sweeper.spec import spec_from_dict
    from sweeper.study import create_study

    import tomllib

    data = best_study[1].parent / "data.jsonl"
    spec = tomllib.loads(SPEC.format(n_trials=1, model=best_study[1], data=data))
    store = f"sqlite:///{tmp_path / 'empty.db'}"
    create_study(spec_from_dict(spec), store)
    return store


@pytest.mark.parametrize("case, code, error", [
    ("no complete trial", 1, "Error: study 'demo' has no complete trial yet"),
    ("no token", 2, "Error: pushing to alice/m needs a Hugging Face token with write access: set the environment "
                    "variable HF_TOKEN, then run again"),
    ("bad token", 2, "Error: the Hugging Face Hub refused the push to alice/m (401: Invalid credentials in "
                     "Authorization header): the token in HF_TOKEN must be valid and may write to that namespace"),
    ("read token", 2, "Error: the Hugging Face token in HF_TOKEN is a read token: pushing to alice/m needs one with "
                      "write access (huggingface.co/settings/tokens)"),
    ("another's namespace", 2, "Error: the Hugging Face Hub refused the push to bob/m (403: You don't have the rights "
                               "to create a model under this namespace): the token in HF_TOKEN must be valid"),
    ("bad repo id", 2, "Error: --push-to 'alice/m/x' is not a Hub repo id (like your-name/model-name)"),
    ("tokens and epochs", 2, "Error: give --train-tokens or --epochs, not both"),
    ("no prompts file", 2, "Error: cannot read prompts from {out}.txt: No such file or directory"),
    ("another budget's folder", 2, "Error: {out} holds a full run with another budget (checkpoint_every 1, asked "
                                   "1000): give the --epochs, --train-tokens and --checkpoint-every it started with"),
])
def test_each_failure_a_user_can_cause_is_one_line_before_any_training(case, code, error, best_study, hub, tmp_path,
                                                                         monkeypatch, request):
    store, _ = best_study
    out = tmp_path / "full"
    args = ["full-run", "--store", store, "--out", str(out), "--push-to", "alice/m"]
    tokens = {"bad token": "hf_not_a_token_the_hub_issued", "read token": hub.add_token("alice", "read")}
    token = tokens.get(case) or hub.add_token("alice")
    monkeypatch.setenv("HF_TOKEN", token)
    if case == "no complete trial":
        args[2] = request.getfixturevalue("empty_study")
    elif case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "another's namespace":
        args[-1] = "bob/m"
    elif case == "bad repo id":
        args[-1] = "alice/m/x"
    elif case == "tokens and epochs":
        args += ["--train-tokens", "1000", "--epochs", "1"]
    elif case == "no prompts file":
        args += ["--prompts", f"{out}.txt"]
    elif case == "another budget's folder":
        out.mkdir()
        budget = {"train_tokens": None, "train_examples": 184, "evals": 1, "checkpoint_every": 1}
        (out / "full_run.json").write_text(json.dumps({"study": "demo", "best_trial": 0, "params": {}, "budget": budget}))

    result = CliRunner().invoke(cli, args)

    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code and lines[-1].startswith(error.replace("{out}", str(out))), result.output
    assert "Traceback" not in result.output and not (out / "checkpoints").exists()
    assert all(secret not in result.output for secret in [token, *tokens.values()])


def test_the_hub_stand_in_refuses_what_the_hub_refuses(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from huggingface_hub.utils import get_session

    http = get_session()  # huggingface_hub's own HTTP client
    api = HfApi(token=hub.add_token("alice"))
    api.create_repo("alice/m")
    with pytest.raises(HfHubHTTPError) as existing:
        api.create_repo("alice/m")  # exist_ok=False
    assert existing.value.response.status_code == 409
    assert api.create_repo("alice/m", exist_ok=True).repo_id == "alice/m"
    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi(token=False).create_repo("alice/n")
    assert anonymous.value.response.status_code == 401
    auth = {"Authorization": f"Bearer {api.token}"}
    commit = f"{hub.url}/api/models/alice/m/commit/main"
    header = json.dumps({"key": "header", "value": {"summary": "s", "description": ""}})
    assert http.post(commit, headers=auth, content=header).status_code == 400  # not declared ndjson
    pointer = json.dumps({"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64,
                                                      "size": 1}})
    ndjson = {**auth, "Content-Type": "application/x-ndjson"}
    assert http.post(commit, headers=ndjson, content=f"{header}\n{pointer}\n").status_code == 422  # never uploaded
    assert http.post(commit, headers=ndjson, content=pointer + "\n").status_code == 400  # no header line first
    weights = json.dumps({"key": "file", "value": {"path": "w.safetensors", "encoding": "base64", "content": "AAAA"}})
    refused = http.post(commit, headers=ndjson, content=f"{header}\n{weights}\n")
    assert refused.status_code == 400 and "binary files" in refused.headers["X-Error-Message"]  # not through LFS

    data = b"weights"
    oid = hashlib.sha256(data).hexdigest()
    batch = http.post(f"{hub.url}/alice/m.git/info/lfs/objects/batch", headers=auth, json={
        "operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]}).json()
    actions = batch["objects"][0]["actions"]
    assert http.put(actions["upload"]["href"], content=data).status_code == 200
    verify = actions["verify"]["href"]
    read_only = {"Authorization": f"Bearer {hub.add_token('alice', 'read')}"}
    assert http.post(verify, headers=read_only, json={"oid": oid, "size": len(data)}).status_code == 403
    assert http.post(verify, headers=auth, json={"oid": oid, "size": len(data) + 1}).status_code == 404
    assert http.post(verify, headers=auth, json={"oid": oid, "size": len(data)}).status_code == 200
    wrong_size = json.dumps({"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": oid,
                                                         "size": len(data) + 1}})
    assert http.post(commit, headers=ndjson, content=f"{header}\n{wrong_size}\n").status_code == 422
    assert hub.repos["alice/m"]["commits"] == []


def test_the_full_run_notebook_stopped_then_run_again_continues_merges_and_pushes(best_study, hub, kernel, tmp_path,
                                                                                    monkeypatch):
    from sweeper.notebook import fill

    store, model_dir = best_study
    token = hub.add_token("alice")
    monkeypatch.setenv("HF_TOKEN", token)  # on this machine the notebook's secrets are environment variables
    path = tmp_path / "full.ipynb"
    rendered = CliRunner().invoke(cli, ["best", "--store", store, "--notebook", "local", "-o", str(path),
                                        "--push-to", "alice/nb-full"])
    assert rendered.exit_code == 0, rendered.output
    assert "it reads the secrets HF_TOKEN" in rendered.stderr
    nb = nbformat.read(path, as_version=4)
    assert [c.get("id") for c in nb.cells] == ["intro", "parameters", "sweeper-code", "install", "check", "secrets",
                                               "full-run"]
    out = tmp_path / "full"
    fill(nb, "parameters", {"out": str(out), "checkpoint_every": 1})  # as papermill -p would

    monkeypatch.setenv("SWEEPER_DEADLINE_HOURS", STOP_AFTER_ONE_STEP)
    first = nbformat.reads(nbformat.writes(nb), as_version=4)
    failed = run_cells(first, kernel, tmp_path)
    assert failed is not None and failed["cell"] == "full-run" and failed["ename"] == "SystemExit"
    assert STOPPED.fullmatch(failed["evalue"]) and "\n" not in failed["evalue"]

    monkeypatch.delenv("SWEEPER_DEADLINE_HOURS")  # a new session: a fresh kernel, Run all again
    second = nbformat.reads(nbformat.writes(nb), as_version=4)
    assert run_cells(second, kernel, tmp_path) is None
    assert text_of(second, "secrets").strip() == "HF_TOKEN: from the environment variable"
    shown = text_of(second, "full-run")
    assert f"resuming from {out / 'checkpoints' / 'step-000001'} (step 1/2)" in shown
    assert shown.count("  before: ") == 3 and shown.count("  after:  ") == 3
    assert f"pushed to {hub.url}/alice/nb-full" in shown
    assert_merged_is_base_plus_adapter(out, model_dir)
    assert_pushed_is_merged(hub.repos["alice/nb-full"], out)
    assert token not in path.read_text() + nbformat.writes(first) + nbformat.writes(second)


@pytest.mark.parametrize("platform", ["colab", "kaggle"])
def test_the_full_run_notebook_carries_this_sweeper_and_no_secret(platform):
    from sweeper.notebook import render_full_run

    nb = render_full_run(platform, STORES["postgresql"], "demo", push_to="alice/m", epochs=2)

    text = nbformat.writes(nb)
    nbformat.validate(nbformat.reads(text, as_version=4))
    assert "pg-Secret-42" not in text and "HF_TOKEN" in text  # the store's password and the token: secrets, by name
    values = parameters(nb)
    assert (values["store"], values["study"], values["push_to"], values["epochs"]) == (None, "demo", "alice/m", 2)
    assert values["secrets"] == ["SWEEPER_STORE"] and values["install"] is None
    assert cell_values(nb, "sweeper-code")["wheel_name"].startswith("sweeper_qlora-")
    assert [c.get("id") for c in nb.cells] == ["intro", "parameters", "sweeper-code", "install", "check", "secrets",
                                               "full-run"] + (["flush"] if platform == "colab" else [])
    assert nb.metadata.get("accelerator") == "GPU" if platform == "colab" else nb.metadata.kaggle.isGpuEnabled


def test_best_notebook_needs_both_a_platform_and_a_file(tmp_path):
    result = CliRunner().invoke(cli, ["best", "--store", f"sqlite:///{tmp_path}/x.db", "--notebook", "local"])
    assert result.exit_code == 2 and result.stderr.strip() == ("Error: give --notebook colab|kaggle|local and -o FILE "
                                                               "together (--push-to goes with them)")
