"""The full run: the study's best config trained on the full data through the trial code, continued from its own
checkpoints after a restart; then the adapter saved, merged into the 16-bit base, sample generations before and
after, and a push to the Hugging Face Hub when asked (the popular Colab QLoRA workshop flow, resumable).

Everything lands in one folder on the platform's lasting disk (Drive on Colab, /kaggle/working on Kaggle):
    checkpoints/   step-NNNNNN/ as a trial writes them: a restart continues from the last
    adapter/       the LoRA adapter and the tokenizer
    merged/        the base with the adapter merged in, 16-bit (fp32 on the CPU), and the tokenizer
    full_run.json  the config it trains; generations.json  the samples before and after
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.errors import SweeperError, UserError, first_line
from sweeper.spec import BudgetSpec, SweepSpec

TOKEN_SECRET = "HF_TOKEN"  # the name huggingface_hub itself reads, and the secret a notebook holds it in
SAMPLE_PROMPTS = 3
MAX_NEW_TOKENS = 32  # short: the samples show a difference, they are not an evaluation


class Stopped(SweeperError):
    """The run stopped early (session deadline, SIGTERM, Ctrl-C) after a checkpoint: running it again continues."""


@dataclass
class FullRunResult:
    out: Path
    best_trial: int
    steps: int
    total_steps: int
    resumed_from_step: int
    eval_loss: float | None
    adapter: Path
    merged: Path
    generations: list[dict[str, str]] = field(default_factory=list)
    """{prompt, before, after} per sample prompt."""
    pushed: str | None = None
    """The Hub repo's URL, when pushed."""


def full_run(store: str, study: str | None = None, *, out: str | Path | None = None, train_tokens: int | None = None,
             epochs: float | None = None, checkpoint_every: int | None = None, push_to: str | None = None,
             prompts: list[str] | None = None, precision: str | None = None, allow_cpu: bool = False,
             log: Callable[[str], None] = print) -> FullRunResult:
    """Train the best config of `study` on the full data (train_tokens, or epochs: 1 when neither), merge, sample
    before and after, push to `push_to`. A folder that holds this run's checkpoints is continued, not restarted."""
    from runner.platform import detect, require_gpu
    from runner.progress import TrialBar, watched
    from runner.data import documents, prepare_data
    from runner.train import Preempted, quiet_libraries, run_trial
    from runner.worker import StopRequest
    from sweeper.report import best_config
    from sweeper.storage import open_store
    from sweeper.study import checkpoint_folder, load_study

    if train_tokens is not None and epochs is not None:
        raise UserError("give --train-tokens or --epochs, not both")
    quiet_libraries()
    platform = detect()
    require_gpu(platform, allow_cpu)
    optuna_study, spec = load_study(open_store(store), study)
    config = best_config(optuna_study, spec)
    out = Path(out).expanduser() if out else platform.checkpoint_root / checkpoint_folder(optuna_study) / "full-run"

    docs = documents(spec)  # tokenized once: an epoch is counted in these documents, and they are trained on
    tokenizer, train_docs, eval_docs = docs
    budget = BudgetSpec(train_tokens=train_tokens,
                        train_examples=None if train_tokens else max(1, round((epochs or 1) * len(train_docs))),
                        evals=spec.budget.evals, checkpoint_every=checkpoint_every or spec.budget.checkpoint_every)
    full = dataclasses.replace(spec, budget=budget)
    run = claim_folder(out, {"study": spec.study, "best_trial": config["best_trial"], "params": config["train"],
                             "budget": dataclasses.asdict(budget)})
    best_trial, params = run["best_trial"], run["params"]
    token, repo_id = prepare_push(push_to) if push_to else (None, None)  # before hours of training, not after
    picked = params == json.loads(json.dumps(config["train"]))
    log(f"full run of study {spec.study!r}: best trial #{best_trial}"
        + (f" (eval loss {config['eval_loss']:.4f})" if picked else "")
        + f", learning rate {params['learning_rate']:.3g}, batch size {params['batch_size']}; "
        + (f"{train_tokens:,} tokens" if train_tokens else f"{epochs or 1:g} epoch(s) of {len(train_docs):,} examples")
        + f"; into {out}")
    if not picked:
        log(f"the study's best has moved since this full run started: now trial #{config['best_trial']} (eval loss "
            f"{config['eval_loss']:.4f}); {out} continues the config it started with (another --out trains the new "
            "best)")

    sweep_data = prepare_data(full, docs)
    bar = TrialBar(0) if watched() else None
    if bar is not None:
        bar.label = "full run"  # not one of the study's trials
    stop = StopRequest(platform)
    try:
        with stop.signals():
            result = run_trial(full, params, out / "checkpoints", sweep_data, None, precision=precision, stop=stop,
                               **({"progress": bar, "log": bar.above(log)} if bar is not None else {"log": log}))
    except Preempted as e:
        raise Stopped(f"{e.reason}: stopped at {e.checkpoint}; run the full run again to continue from there") from None
    finally:
        if bar is not None:
            bar.close()
    if result.diverged:
        raise SweeperError(f"the full run diverged: {result.diverged}; nothing was merged or pushed. Its last "
                           f"checkpoint is {result.checkpoint or 'not written'}; a lower learning rate (or bf16 where "
                           "the GPU has it) trains further")
    log(f"trained {result.steps} steps" + (f" (continued from step {result.resumed_from_step})"
                                            if result.resumed_from_step else "")
        + (f": eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))

    adapter = save_adapter(Path(result.checkpoint), tokenizer, out / "adapter")
    samples = ([sample_prompt(p, spec, tokenizer) for p in prompts] if prompts
               else eval_prompts(tokenizer, eval_docs, spec))
    merged, generations = merge(spec, adapter, tokenizer, samples, out / "merged", precision)
    write(out / "generations.json", json.dumps(generations, indent=2) + "\n")
    for g in generations:
        log(f"prompt: {g['prompt']!r}\n  before: {g['before']!r}\n  after:  {g['after']!r}")
    log(f"adapter: {adapter}\nmerged model: {merged}")
    done = FullRunResult(out, best_trial, result.steps, result.total_steps, result.resumed_from_step,
                         result.eval_loss, adapter, merged, generations)
    if repo_id:
        done.pushed = push(merged, repo_id, token, f"sweeper full run of study {spec.study}, best trial #{best_trial}")
        log(f"pushed to {done.pushed}")
    return done


# ---------------------------------------------------------------------------------------------
# The folder, the data and the prompts


def claim_folder(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The run this folder trains: the one recorded in it (its config, even where the study's best has moved since:
    its checkpoints are that config's), else `run`, recorded. Another study's run, or another budget, is refused."""
    record, run = out / "full_run.json", json.loads(json.dumps(run))
    if record.is_file():
        try:
            held = json.loads(record.read_text())
        except (OSError, ValueError):
            held = None
        if not (isinstance(held, dict) and run.keys() <= held.keys() and isinstance(held["budget"], dict)):
            raise UserError(f"{record} is not a full run's record: give another --out, or delete {out} to start over")
        study, budget = held["study"], held["budget"]
        if study != run["study"]:
            raise UserError(f"{out} holds the full run of study {study!r}: give another --out")
        if budget != run["budget"]:
            differs = "; ".join(f"{k} {budget.get(k)}, asked {v}" for k, v in run["budget"].items()
                                if budget.get(k) != v)
            raise UserError(f"{out} holds a full run with another budget ({differs}): give the --epochs, "
                            f"--train-tokens and --checkpoint-every it started with, another --out, or delete {out} "
                            "to start over")
        return held
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty and holds no full run: give another --out")
    write(record, json.dumps(run, indent=2) + "\n")
    return run


def eval_prompts(tokenizer, held_out: list, spec: SweepSpec) -> list[str]:
    """Sample prompts from the held-out split, exactly as training fed them: a chat example's prompt (its template's
    special tokens kept), or a text document's first half."""
    from runner.data import IGNORE

    chat = spec.data.prompt_field is not None
    prompts = []
    for doc in held_out[:SAMPLE_PROMPTS]:
        ids = [t for t, label in zip(doc.input_ids, doc.labels) if label == IGNORE] if chat else []
        ids = ids or doc.input_ids[: max(1, len(doc.input_ids) // 2)]
        prompts.append(tokenizer.decode(ids, skip_special_tokens=not chat))  # text: generate() adds them back
    return prompts


def sample_prompt(prompt: str, spec: SweepSpec, tokenizer) -> str:
    """A prompt a user gives, in the format the model was trained on (chat data: the same instruction format)."""
    if spec.data.prompt_field is None:
        return prompt
    from runner.data import _prompt_text  # the one place that format is made

    return _prompt_text(tokenizer, prompt)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a text file; blank lines skipped."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts from {path}: {getattr(e, 'strerror', None) or e}") from None
    if not any(lines):
        raise UserError(f"{path} holds no prompt (one a line)")
    return [line for line in lines if line]


def write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise cannot_write(path, e) from None


def cannot_write(path: Path, e: BaseException) -> SweeperError:
    """One line for a failed write; a full disk says so (safetensors reports it as its own error, not OSError)."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "StorageFull" in str(e):
        return SweeperError(f"disk full writing {path}: free some space, or give --out on a disk that has it")
    return SweeperError(f"cannot write {path}: {getattr(e, 'strerror', None) or first_line(e)}")


# ---------------------------------------------------------------------------------------------
# Adapter, merge, samples


def save_adapter(checkpoint: Path, tokenizer, folder: Path) -> Path:
    """The last checkpoint's adapter (what peft's save_pretrained wrote there) and the tokenizer, in a folder."""
    def fill(tmp: Path) -> None:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(checkpoint / name, tmp / name)
        tokenizer.save_pretrained(tmp)

    return write_whole(folder, fill, OSError)


def write_whole(folder: Path, fill, errors: type[BaseException]) -> Path:
    """fill(tmp) writes the folder's files into a hidden folder beside it, which then takes its place: a folder that
    is there is whole. errors: what a failed write raises (one line, cannot_write)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except errors as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(folder, e) from None
    return folder


def merge(spec: SweepSpec, adapter: Path, tokenizer, prompts: list[str], folder: Path,
          precision: str | None = None) -> tuple[Path, list[dict[str, str]]]:
    """The base loaded unquantized in 16-bit (fp32 on the CPU), sampled; the adapter merged in (peft's
    merge_and_unload), sampled again, saved with the tokenizer. Returns (folder, [{prompt, before, after}])."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runner.model import free_memory, pick_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    free_memory(device)  # the 4-bit training model goes before the 16-bit one comes
    dtype = pick_precision(device, precision)
    model = AutoModelForCausalLM.from_pretrained(spec.model.id, dtype=dtype, device_map={"": device})
    chat = spec.data.prompt_field is not None
    before = [generate(model, tokenizer, p, chat) for p in prompts]
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    after = [generate(model, tokenizer, p, chat) for p in prompts]

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_whole(folder, fill, Exception)  # OSError, or safetensors' own error for the same failures
    return folder, [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)]


def prompt_inputs(tokenizer, prompt: str, chat: bool):
    """A prompt's tokens as runner.data.tokenize makes them: a chat prompt is templated text, special tokens and all
    (nothing added); a text document gets what the tokenizer adds (a BOS)."""
    return tokenizer(prompt, add_special_tokens=not chat, return_tensors="pt")


def generate(model, tokenizer, prompt: str, chat: bool) -> str:
    """Greedy and short: the continuation only."""
    import torch

    inputs = prompt_inputs(tokenizer, prompt, chat).to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub


def prepare_push(repo: str) -> tuple[str, str]:
    """(token, repo id) for a push, settled before any training: HF_TOKEN from the environment or the platform's
    secret, checked with the Hub, and the repo created (private; an existing one is kept as it is). Never printed."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from sweeper.platforms import how_to_add_secret, platform_secret

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UserError(f"--push-to {repo!r} is not a Hub repo id (like your-name/model-name): {first_line(e)}") from None
    token = os.environ.get(TOKEN_SECRET) or platform_secret(TOKEN_SECRET)
    if not token:
        raise UserError(f"pushing to {repo} needs a Hugging Face token with write access: "
                        f"{how_to_add_secret(TOKEN_SECRET)}, then run again")
    api = HfApi(token=token)
    try:
        role = api.whoami().get("auth", {}).get("accessToken", {}).get("role")
        if role == "read":
            raise UserError(f"the Hugging Face token in {TOKEN_SECRET} is a read token: pushing to {repo} needs one "
                            "with write access (huggingface.co/settings/tokens)")
        repo_id = api.create_repo(repo, private=True, exist_ok=True).repo_id
    except SweeperError:
        raise
    except Exception as e:  # noqa: BLE001  refused, or no network: one line either way
        raise hub_error(e, repo) from None
    return token, repo_id


def push(folder: Path, repo_id: str, token: str, message: str) -> str:
    """Upload the folder to the repo in one commit; the repo's URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # a bar per file would bury the run's own lines
    try:
        HfApi(token=token).upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except Exception as e:  # noqa: BLE001  refused, or no network: one line either way
        raise hub_error(e, repo_id) from None
    return f"{constants.ENDPOINT}/{repo_id}"


def hub_error(e: Exception, repo: str) -> SweeperError:
    """One line for what the Hub said (or that it could not be reached); a refusal is the user's to fix."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    said = (response.headers.get("X-Error-Message") or "").strip() if response is not None else ""  # the Hub's words
    said = f": {said.splitlines()[0]}" if said else ""
    if status in (401, 403):
        return UserError(f"the Hugging Face Hub refused the push to {repo} ({status}{said}): the token in "
                         f"{TOKEN_SECRET} must be valid and may write to that namespace")
    if status is not None:
        return SweeperError(f"the Hugging Face Hub answered {status} for {repo}{said or ': ' + first_line(e)}")
    return SweeperError(f"cannot reach the Hugging Face Hub for {repo}: {first_line(e)}")
