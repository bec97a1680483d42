"""`sweeper show N`: one trial in full at 80 and 200 columns, and as JSON, on a real journal store."""

from __future__ import annotations

import json
import time

import pytest
import test_cli
from click.testing import Result
from optuna.trial import TrialState
from test_report import machine_card

from sweeper.record import CARD, DIVERGED, SEED
from sweeper.leases import LEASE, hand_over
from sweeper.study import load_study, suggest

POINT = {"learning_rate": 5e-4, "batch_size": 16}
EVALS = [1.6, 1.4, 1.25, 1.2]
WORKER = {"id": "bob/0a1b2c3d", "account": "bob", "platform": "colab", "gpu": "NVIDIA H100 80GB HBM3"}
LONG_PATH = "/content/drive/MyDrive/sweeps/a-team-sweep-with-a-long-name/checkpoints/demo/trial-0004/step-000020"
NAN = "training loss became nan at step 3 (bf16)"


def result(checkpoint: str, eval_losses: list[float]) -> dict:
    """What runner.train.result_attrs writes when a trial ends."""
    return {"eval_loss": eval_losses[-1], "pruned_at": None, "eval_losses": eval_losses,
            "train_loss": [[1, 2.5], [5, 2.2], [10, 2.1], [15, 1.8], [20, 1.9]], "steps": 20, "total_steps": 20,
            "train_tokens": 20480, "tokens_per_s": 1234.5, "peak_mem_mb": 5120.0, "wall_time_s": 120.0,
            "micro_batch": 8, "grad_accum": 2, "precision": "bf16", "gradient_checkpointing": False,
            "checkpoint": checkpoint, "resumed_from_step": 0, "gpus": 1,
            "versions": {"torch": "2.9.1", "transformers": "4.57.3", "peft": "0.18.0", "bitsandbytes": "0.49.0",
                         "optuna": "4.6.0"}}


@pytest.fixture
def store(spec_toml, tmp_path) -> str:
    """#0 complete; #1 its repeat (seed 1), complete; #2 running, one eval in; #3 taken over, resumed as #4,
    which completed with a long checkpoint path."""
    url = f"journal://{tmp_path / 'sweep.log'}"
    assert sweeper(80, "init", spec_toml, "--store", url).exit_code == 0
    study, spec = load_study(url, "demo")

    def start(point, **user_attrs):
        study.enqueue_trial(point, user_attrs=user_attrs)
        trial = study.ask()
        suggest(trial, spec)
        trial.set_user_attr("worker", WORKER)
        return trial

    for seed, losses in [(None, EVALS), (1, [1.7, 1.5, 1.3, 1.24])]:
        trial = start(POINT, **({SEED: seed} if seed else {}))
        for k, loss in enumerate(losses, 1):
            trial.report(loss, k)
        trial.set_user_attr("result", result(f"/content/ckpt/demo/trial-{trial.number:04d}/step-000020", losses))
        study.tell(trial, losses[-1])
    running = start({"learning_rate": 1e-3, "batch_size": 8})
    running.report(1.9, 1)
    lease = {"worker": WORKER["id"], "checkpoint": "/content/ckpt/demo/trial-0002", "step": 12, "total_steps": 40}
    study._storage.set_trial_system_attr(running._trial_id, LEASE, {**lease, "at": time.time()})  # as Heartbeat writes it
    taken = start({"learning_rate": 2e-4, "batch_size": 8})
    assert hand_over(study, study._storage.get_trial(taken._trial_id), {"stale_reason": "stale: test"}, "/ckpt/t3")
    resume = study.ask()
    suggest(resume, spec)
    resume.set_user_attr("result", result(LONG_PATH, [1.3]))
    study.tell(resume, 1.3)
    return url


def sweeper(columns: int, *args: str) -> Result:
    return test_cli.sweeper(*args, env={"COLUMNS": str(columns)})


@pytest.mark.parametrize("columns", [80, 200])
def test_show_prints_a_trial_in_full_within_the_terminal_width(store, columns):
    result = sweeper(columns, "show", "1", "--store", store)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= columns
    text = " ".join(" ".join(lines).split())  # the same words, however a width wrapped them
    assert lines[0].split() == ["trial", "1", "complete,", "eval", "loss", "1.2400"]
    assert "params learning_rate=0.0005, batch_size=16" in text
    assert "seed 1 (a repeat of its config)" in text
    assert "config 2 complete runs: mean eval loss 1.2200 ± 0.0283 (trials #0, #1)" in text
    assert "eval loss █▅▂▁ 4 of 4 evals: 1.7000 1.5000 1.3000 1.2400" in text  # low loss, low bar
    assert "train loss █▅▄▁▂ 2.5000 at step 1, lowest 1.8000 at step 15, last 1.9000 at step 20" in text
    assert "checkpoint  /content/ckpt/demo/trial-0001/step-000020" in result.stdout  # whole, on one line
    assert "worker bob/0a1b2c3d, account bob, colab" in text
    assert "GPU NVIDIA H100 80GB HBM3, micro-batch 8 x 2 accumulation, bf16" in text
    assert "run 20/20 steps, 120.0 s, 1,234 tok/s, peak 5,120 MB" in text
    assert "versions torch 2.9.1, transformers 4.57.3, peft 0.18.0, bitsandbytes 0.49.0, optuna 4.6.0" in text
    if columns == 200:
        assert any(line.startswith("versions    torch 2.9.1") and line.endswith("optuna 4.6.0") for line in lines)


def test_show_prints_a_checkpoint_path_longer_than_the_line_whole(store):
    result = sweeper(80, "show", "4", "--store", store)
    lines = result.stdout.splitlines()
    assert LONG_PATH in lines  # on a line of its own, in one piece to copy
    assert max(len(line) for line in lines if line != LONG_PATH) <= 80
    assert "chain       #3 fail -> #4 complete" in lines
    assert "seed        0 (the spec's train.seed)" in lines


def test_show_of_a_running_trial_gives_its_evals_so_far(store):
    result = sweeper(80, "show", "2", "--store", store)
    assert result.exit_code == 0
    assert "trial 2     running, eval loss 1.9000" in result.stdout
    assert "1 of 4 evals: 1.9000" in result.stdout
    assert "run         step 12/40 at its last heartbeat" in result.stdout
    assert "checkpoint  /content/ckpt/demo/trial-0002" in result.stdout
    assert any(line.startswith("note        lease ") and line.endswith(" old") for line in result.stdout.splitlines())


def test_show_json_holds_the_trial_its_curves_chain_and_config(store):
    detail = json.loads(sweeper(80, "show", "3", "--store", store, "--json").stdout)
    assert (detail["number"], detail["state"], detail["seed"]) == (3, "FAIL", None)
    assert detail["chain"] == [{"number": 3, "state": "FAIL"}, {"number": 4, "state": "COMPLETE"}]
    assert detail["note"].startswith("resumed as #4")
    one = json.loads(sweeper(80, "show", "1", "--store", store, "--json").stdout)
    assert one["eval_losses"] == [[1, 1.7], [2, 1.5], [3, 1.3], [4, 1.24]] and one["train_loss"][0] == [1, 2.5]
    assert (one["seed"], one["checkpoint"], one["worker"]) == (1, "/content/ckpt/demo/trial-0001/step-000020", WORKER)
    assert one["config"]["trials"] == [0, 1] and one["result"]["micro_batch"] == 8 and "train_loss" not in one["result"]


def test_show_gives_params_to_3_significant_digits_and_its_json_in_full(store):
    study, spec = load_study(store, "demo")
    study.enqueue_trial({"learning_rate": 1.23456789e-4, "batch_size": 8})
    trial = study.ask()
    suggest(trial, spec)
    study.tell(trial, 1.5)

    assert "params      learning_rate=0.000123, batch_size=8" in sweeper(80, "show", "5", "--store", store).stdout
    detail = json.loads(sweeper(80, "show", "5", "--store", store, "--json").stdout)
    assert detail["params"] == {"learning_rate": 1.23456789e-4, "batch_size": 8}  # for programs: as it ran


@pytest.fixture
def diverged(store) -> str:
    """The store plus bob's machine card, and #5: bob's run that diverged after one eval."""
    study, spec = load_study(store, "demo")
    card = {**machine_card("bob", WORKER["gpu"], "9.0", "bf16", 8, True), "memory_gb": 79.1}
    study.set_user_attr(CARD + WORKER["id"], card)
    study.enqueue_trial({"learning_rate": 1e-3, "batch_size": 16})
    trial = study.ask()
    suggest(trial, spec)
    trial.set_user_attr("worker", WORKER)
    trial.report(1.5, 1)
    trial.set_user_attr("result", {"eval_losses": [1.5], "steps": 3, "total_steps": 20, "precision": "bf16",
                                   "gpus": 1, DIVERGED: NAN})
    study.tell(trial, state=TrialState.PRUNED)
    return store


@pytest.mark.parametrize("columns", [80, 200])
def test_show_gives_the_machine_card_and_why_a_trial_diverged(diverged, columns):
    result = sweeper(columns, "show", "5", "--store", diverged)

    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= columns
    text = " ".join(" ".join(lines).split())
    assert text.startswith(f"trial 5 pruned, eval loss 1.5000 diverged {NAN}; told to Optuna as pruned, its value "
                           "the last finite eval loss params ")
    assert ("machine NVIDIA H100 80GB HBM3, compute capability 9.0, 79.1 GB; bf16, micro-batch 8; fused kernels on; "
            "torch 2.11.0+cu128, cuda 12.8, bitsandbytes 0.50.2") in text
    assert ("preflight passed in 14.2 s: device pass 0.1 s, bitsandbytes pass 0.4 s, precision pass 1.1 s, training "
            "step pass 3.2 s, memory pass 9.2 s, fused kernels pass 0.0 s") in text
    assert "note" not in text  # its only note, that it diverged, is said above


def test_show_json_gives_the_card_of_the_worker_that_ran_the_trial(diverged):
    five, four = (json.loads(sweeper(80, "show", n, "--store", diverged, "--json").stdout) for n in ("5", "4"))
    assert five["card"]["gpu"] == WORKER["gpu"] and five["card"]["ok"] is True
    assert five["result"][DIVERGED] == NAN and five["note"] == f"diverged: {NAN}"
    assert four["card"] is None  # a trial with no worker recorded


@pytest.mark.parametrize("number", ["9", "-1"])
def test_show_of_an_unknown_trial_exits_2_with_one_line(store, number):
    result = sweeper(80, "show", "--store", store, "--", number)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == f"Error: no trial {number} in study 'demo': its trials are #0 to #4"


def test_show_of_a_second_resume_prints_the_whole_chain(store):
    """#3 was resumed as #4, which completed; a retry by hand made #5, resuming #3 too (it failed as surplus): show 5
    gives the chain through #4, and #5 beside it."""
    study, _ = load_study(store, "demo")
    study.enqueue_trial({"learning_rate": 2e-4, "batch_size": 8}, user_attrs={"resumes": 3})
    late = study.ask()
    late.set_user_attr("result", {"fail_reason": "surplus: trial 4 resumes trial 3 too"})
    study.tell(late, state=TrialState.FAIL)
    result = sweeper(200, "show", "5", "--store", store)
    assert "chain       #3 fail -> #4 complete; #5 fail resumed #3 too" in result.stdout.splitlines()
    detail = json.loads(sweeper(80, "show", "5", "--store", store, "--json").stdout)
    assert [c["number"] for c in detail["chain"]] == [3, 4]
    assert detail["other_resumes"] == [{"number": 5, "state": "FAIL", "resumes": 3}]
