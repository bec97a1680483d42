"""A worker process whose trials take a second, for coordination tests: `python tests/fast_trainer.py --store URL ...`.

It runs the real `runner.run_worker` loop (claims, pruning, telling, drive shards, sheet views) with
runner.train's trainer swapped for a small deterministic one: the eval loss is a smooth function of the
params, each step sleeps STEP_S, a checkpoint (JSON) is written every CHECKPOINT_EVERY steps and a
trial resumes from the latest one in its folder. Arguments are `sweeper worker`'s.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

STEPS = int(os.environ.get("FAST_TRAINER_STEPS", 8))
STEP_S = float(os.environ.get("FAST_TRAINER_STEP_S", 0.1))
CHECKPOINT_EVERY = 2


def loss_of(params: dict, progress: float) -> float:
    """Lowest near learning_rate 1e-3; falls as training progresses."""
    lr = params.get("learning_rate", 1e-3)
    return 1.0 + 0.5 * (math.log10(lr) + 3) ** 2 + 0.01 * params.get("batch_size", 8) / 8 + 0.5 * (1 - progress)


def checkpoint(trial_dir: Path, step: int, params: dict) -> Path:
    path = trial_dir / f"step-{step:06d}.json"
    temp = trial_dir / f".{path.name}.tmp"
    temp.write_text(json.dumps({"step": step, "params": params}))
    os.replace(temp, path)
    return path


def prepare_data(spec):
    return SimpleNamespace(train=[0] * 16, eval=[0] * 4)


def run_trial(spec, params, trial_dir, sweep_data, report=None, *, device=None, precision=None, log=print, stop=None):
    from runner.train import Preempted, TrialResult

    started = time.perf_counter()
    trial_dir = Path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    done = sorted(trial_dir.glob("step-*.json"))
    step = json.loads(done[-1].read_text())["step"] if done else 0
    resumed_from = step
    evals = spec.budget.evals
    eval_losses, pruned_at = [], None
    while step < STEPS:
        time.sleep(STEP_S)
        step += 1
        (trial_dir / "progress").write_text(str(step))  # how far it got, for counting steps redone after a kill
        if step % CHECKPOINT_EVERY == 0:
            checkpoint(trial_dir, step, params)
        if stop is not None and step < STEPS and (why := stop()) is not None:
            raise Preempted(why, checkpoint(trial_dir, step, params))
        if step * evals % STEPS == 0:  # evals spread evenly over the steps
            k = step * evals // STEPS
            eval_losses.append(loss_of(params, step / STEPS))
            if report is not None and report(k, eval_losses[-1]):
                pruned_at = k
                break
    return TrialResult(eval_loss=eval_losses[-1] if eval_losses else None, pruned_at=pruned_at, eval_losses=eval_losses,
                       train_loss=[], steps=step, total_steps=STEPS, train_tokens=step * 100, tokens_per_s=100 / STEP_S,
                       peak_mem_mb=0.0, wall_time_s=time.perf_counter() - started, micro_batch=1, grad_accum=1,
                       precision="fp32", gradient_checkpointing=False, checkpoint=str(trial_dir),
                       resumed_from_step=resumed_from)


def main() -> None:
    import runner.train
    from sweeper.cli import cli

    runner.train.prepare_data, runner.train.run_trial = prepare_data, run_trial
    runner.train.quiet_libraries = lambda: None
    cli.main(["worker", *sys.argv[1:]], prog_name="sweeper")


if __name__ == "__main__":
    main()
