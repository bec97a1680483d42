"""A worker process whose trials take a second, for coordination tests: `python tests/fast_trainer.py --store URL ...`.

It runs the real `runner.run_worker` loop (leases, claims, pruning, telling, drive shards, sheet views) with this
module as its trainer (`run_worker(..., trainer=fast_trainer)`), a small deterministic one: the eval loss is a
smooth function of the params, each step sleeps STEP_S, a checkpoint (JSON) is written every CHECKPOINT_EVERY
steps and on a stop request, and a trial resumes from the latest one in its folder. Arguments are `sweeper
worker`'s.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

STEPS = int(os.environ.get("FAST_TRAINER_STEPS", 8))
STEP_S = float(os.environ.get("FAST_TRAINER_STEP_S", 0.1))
CHECKPOINT_EVERY = 2


def loss_of(params: dict, progress: float) -> float:
    """Lowest near learning_rate 1e-3; falls as training progresses."""
    lr = params.get("learning_rate", 1e-3)
    return 1.0 + 0.5 * (math.log10(lr) + 3) ** 2 + 0.01 * params.get("batch_size", 8) / 8 + 0.5 * (1 - progress)


def checkpoint(trial_dir: Path, step: int, params: dict, eval_losses: list[float]) -> Path:
    path = trial_dir / f"step-{step:06d}.json"
    temp = trial_dir / f".{path.name}.tmp"
    temp.write_text(json.dumps({"step": step, "params": params, "eval_losses": eval_losses}))
    os.replace(temp, path)
    return path


def quiet_libraries() -> None:
    pass  # no libraries, no chatter


def prepare_data(spec):
    return SimpleNamespace(train=[0] * 16, eval=[0] * 4)


@dataclass
class BaseModel:
    """What a worker keeps across its trials (runner.model.BaseModel): here, the trials it served."""

    trials: list[str] = field(default_factory=list)


result_attrs = asdict


@dataclass
class TrialResult:  # the fields of runner.train.TrialResult that the worker and the tests read
    eval_loss: float | None
    pruned_at: int | None
    eval_losses: list[float]
    steps: int
    tokens_per_s: float
    wall_time_s: float
    checkpoint: str
    resumed_from_step: int
    gpus: int = 1
    diverged: str = ""


def preflight(spec, sweep_data, base, *, precision=None, log=print) -> dict:
    """runner.doctor's machine card, for a trainer that uses no device: one check, which says so."""
    check = {"name": "fast trainer", "status": "pass", "seconds": 0.0, "detail": "no device: a trial sleeps"}
    return {"device": "cpu", "gpu": "cpu", "capability": None, "memory_gb": None, "versions": {},
            "precision": precision or "fp32", "micro_batch": None, "gradient_checkpointing": False, "fused": False,
            "fused_note": "the fast trainer", "checks": [check], "ok": True, "seconds": 0.0, "at": time.time()}


class Preempted(Exception):
    def __init__(self, reason: str, checkpoint: Path):
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


def run_trial(spec, params, trial_dir, sweep_data, report=None, *, device=None, precision=None, log=print, stop=None,
              progress=None, base=None):
    started = time.perf_counter()
    trial_dir = Path(trial_dir)
    if base is not None:
        base.trials.append(trial_dir.name)
    trial_dir.mkdir(parents=True, exist_ok=True)
    done = sorted(trial_dir.glob("step-*.json"))
    state = json.loads(done[-1].read_text()) if done else {"step": 0, "eval_losses": []}
    step, eval_losses, pruned_at = state["step"], state["eval_losses"], None
    resumed_from = step
    evals = spec.budget.evals
    while step < STEPS:
        time.sleep(STEP_S)
        step += 1
        (trial_dir / ".progress").write_text(str(step))  # how far it got, for counting steps redone after a kill:
        os.replace(trial_dir / ".progress", trial_dir / "progress")  # whole, even when killed mid-write
        if step * evals % STEPS == 0:  # evals spread evenly over the steps, as runner.train orders them
            k = step * evals // STEPS
            eval_losses.append(loss_of(params, step / STEPS))
            if report is not None and report(k, eval_losses[-1]):
                pruned_at = k
                break
        if progress is not None:
            progress(step, STEPS, 100 / STEP_S, eval_losses[-1] if eval_losses else None)
        if step % CHECKPOINT_EVERY == 0:
            checkpoint(trial_dir, step, params, eval_losses)
        if stop is not None and step < STEPS and (why := stop()) is not None:
            raise Preempted(why, checkpoint(trial_dir, step, params, eval_losses))
    return TrialResult(eval_loss=eval_losses[-1] if eval_losses else None, pruned_at=pruned_at, eval_losses=eval_losses,
                       steps=step, tokens_per_s=100 / STEP_S, wall_time_s=time.perf_counter() - started,
                       checkpoint=str(trial_dir), resumed_from_step=resumed_from)


def main() -> None:
    """`sweeper worker` (its arguments, its last line of JSON) with this module as the trainer, and no GPU to look
    for."""
    import runner.platform
    from runner.worker import run_worker
    from sweeper.cli import worker

    runner.platform.gpu_info = lambda: ("cpu", 0, 0.0)  # no torch to import (2 s a process)
    options = worker.make_context("worker", sys.argv[1:]).params
    summary = run_worker(options.pop("store"), options.pop("study"), **options, trainer=sys.modules[__name__],
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({"worker": summary.worker_id, "trials": summary.trials, "stop_reason": summary.stop_reason}))


if __name__ == "__main__":
    main()
