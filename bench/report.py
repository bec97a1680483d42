"""Benchmark: `sweeper report` against Optuna's `study.trials_dataframe()` on the same study, in one run.

Builds a study of N trials with the user attrs runner/worker.py writes, in a journal store and a
sqlite store under a temp dir, then times from a freshly opened store each time, at each width:
  ours, view:  open_store + load_study + overview.look, printed to a null console (`sweeper report`)
  ours, all:   open_store + load_study + trial_rows + render_all to a null console (`sweeper report --all`)
  ours, json:  load_study + trial_rows + rows_json                                (`sweeper report --json`)
  baseline:    optuna.load_study + study.trials_dataframe()
  load:        optuna.load_study alone, the part all of them share
and prints the median seconds and the ratio baseline / ours (above 1: ours is faster).
Building the 5,000-trial sqlite store takes about two minutes.

    python bench/report.py [--trials 1000 5000] [--repeat 5] [--stores journal sqlite] [--widths 80 200]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from rich.console import Console
from sqlalchemy import event
from sqlalchemy.engine import Engine

from sweeper import overview, report
from sweeper.record import LEASE
from sweeper.spec import spec_from_dict
from sweeper.storage import open_storage, open_store
from sweeper.study import create_study, load_study

SPEC = {
    "study": "bench",
    "n_trials": 5000,
    "model": {"id": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "max_seq_len": 1024},
    "data": {"source": "yahma/alpaca-cleaned", "prompt_field": "instruction", "response_field": "output"},
    "budget": {"train_tokens": 2_000_000, "evals": 8},
}
GPUS = ["Tesla T4", "Tesla P100-PCIE-16GB", "NVIDIA L4", "NVIDIA A100-SXM4-40GB"]
ACCOUNTS = ["alice", "bob", "carol", "dan"]
PLATFORMS = ["colab", "kaggle", "local"]


# ---------------------------------------------------------------------------------------------
# Building the study


def make_trial(number: int, rng: random.Random) -> optuna.trial.FrozenTrial:
    """One finished trial as a worker leaves it: params, eval losses, and its "worker" and "result" attrs."""
    lr = 10 ** rng.uniform(-4.5, -2.7)
    batch = rng.choice([8, 16, 32])
    roll = rng.random()
    state = TrialState.COMPLETE if roll < 0.8 else TrialState.PRUNED if roll < 0.95 else TrialState.FAIL
    evals = 8 if state == TrialState.COMPLETE else rng.randint(1, 7) if state == TrialState.PRUNED else 0
    losses = [2.5 - 0.1 * k + rng.uniform(-0.05, 0.05) for k in range(evals)]
    account, gpu = rng.choice(ACCOUNTS), rng.choice(GPUS)
    worker = {"id": f"{account}/{rng.getrandbits(32):08x}", "account": account, "platform": rng.choice(PLATFORMS), "gpu": gpu}
    steps = 2_000_000 // (1024 * batch)
    micro = rng.choice([2, 4, 8])
    if state == TrialState.FAIL:
        result = {"fail_reason": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    else:
        result = {
            "eval_loss": losses[-1], "pruned_at": evals if state == TrialState.PRUNED else None,
            "eval_losses": losses,
            "train_loss": [[s, 2.6 - s / steps + rng.uniform(-0.1, 0.1)] for s in range(1, steps + 1, max(1, steps // 20))][:20],
            "steps": steps * evals // 8, "total_steps": steps, "train_tokens": 2_000_000 * evals // 8,
            "tokens_per_s": rng.uniform(1500, 9000), "peak_mem_mb": rng.uniform(4000, 14000),
            "wall_time_s": rng.uniform(300, 1500), "micro_batch": micro, "grad_accum": batch // micro,
            "precision": "fp16" if "T4" in gpu or "P100" in gpu else "bf16",
            "checkpoint": f"/content/drive/MyDrive/sweeps/bench/trial-{number:04d}", "resumed_from_step": 0,
            "versions": {"torch": "2.6.0", "transformers": "4.51.3", "peft": "0.15.2", "bitsandbytes": "0.45.5"},
        }
    running = number % 500 == 499  # a few running, their lease beating (sweeper/leases.py)
    if running:
        state, result, losses = TrialState.RUNNING, {}, losses[:3]
    lease = {LEASE: {"worker": worker["id"], "account": account, "platform": worker["platform"], "beat": 7,
                     "at": time.time(), "step": 3 * steps // 8, "total_steps": steps}} if running else {}
    return optuna.trial.create_trial(
        state=state,
        value=losses[-1] if state == TrialState.COMPLETE else None,
        params={"learning_rate": lr, "batch_size": batch},
        distributions={"learning_rate": FloatDistribution(3e-5, 2e-3, log=True),
                       "batch_size": CategoricalDistribution([8, 16, 32])},
        intermediate_values={k + 1: v for k, v in enumerate(losses)},
        user_attrs={"worker": worker, "result": result} if result else {"worker": worker},
        system_attrs=lease,
    )


def _no_fsync(dbapi_connection, _record) -> None:
    if type(dbapi_connection).__module__ == "sqlite3":
        dbapi_connection.execute("PRAGMA synchronous=OFF")


def build(url: str, n: int) -> None:
    """Create the sweeper study and add n trials; sqlite writes skip fsync while building (0.03 s a trial)."""
    event.listen(Engine, "connect", _no_fsync)
    try:
        study, _ = create_study(spec_from_dict(SPEC), url)
        rng = random.Random(n)
        study.add_trials([make_trial(i, rng) for i in range(n)])
    finally:
        event.remove(Engine, "connect", _no_fsync)


# ---------------------------------------------------------------------------------------------
# What is timed


def ours_view(url: str, width: int) -> None:
    store = open_store(url)
    study, spec = load_study(store, "bench")
    with open(os.devnull, "w") as null:
        Console(file=null, width=width).print(overview.look(study, store, spec, width), crop=False)


def ours_all(url: str, width: int) -> None:
    store = open_store(url)
    study, spec = load_study(store, "bench")
    rows = report.trial_rows(study, store)
    with open(os.devnull, "w") as null:
        report.render_all(study, spec, rows, Console(file=null, width=width))


def ours_json(url: str) -> None:
    study, _ = load_study(url, "bench")
    report.rows_json(report.trial_rows(study))


def baseline(url: str) -> None:
    optuna.load_study(study_name="bench", storage=open_storage(url)).trials_dataframe()


def open_only(url: str) -> None:
    """The part both pay: opening the store and loading the study (a journal replays its log here)."""
    optuna.load_study(study_name="bench", storage=open_storage(url))


def median_seconds(fns: list[Callable[[str], None]], url: str, repeat: int) -> list[float]:
    """Median wall time of each fn, interleaved so that drift on the machine hits them alike.

    Each run starts as a fresh process would: with what came before frozen out of the collector's
    reach (imports, earlier runs' leftovers). It ends with a collection inside the timing, so no run
    hides collection work it put off (sweeper pauses the collector while it builds trials; a
    process pays the deferred pass at exit).
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            gc.collect()
            gc.freeze()
            start = time.perf_counter()
            fn(url)
            gc.collect()
            spent.append(time.perf_counter() - start)
            gc.unfreeze()
    return [statistics.median(spent) for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stores", nargs="+", choices=["journal", "sqlite"], default=["journal", "sqlite"])
    parser.add_argument("--widths", type=int, nargs="+", default=[80, 200], help="terminal columns")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.trials:
            urls = {"journal": f"journal://{Path(tmp) / f'{n}.log'}", "sqlite": f"sqlite:///{Path(tmp) / f'{n}.db'}"}
            for kind, url in ((k, urls[k]) for k in args.stores):
                start = time.perf_counter()
                build(url, n)
                print(f"built {n} trials in {kind} in {time.perf_counter() - start:.1f} s", flush=True)
                fns = [*(partial(f, width=w) for w in args.widths for f in (ours_view, ours_all)),
                       ours_json, baseline, open_only]
                for fn in fns:  # warm the page cache and imports once
                    fn(url)
                times = median_seconds(fns, url, args.repeat)
                base, opened, as_json = times[-2], times[-1], times[-3]
                for k, width in enumerate(args.widths):
                    rows.append((n, kind, width, times[2 * k], times[2 * k + 1], as_json, base, opened))

    print()
    print("| trials | store | columns | `report` s | `report --all` s | `report --json` s "
          "| load + `trials_dataframe()` s | of which load s | ratio view | ratio all | ratio json |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, kind, width, view, every, as_json, base, opened in rows:
        print(f"| {n:,} | {kind} | {width} | {view:.3f} | {every:.3f} | {as_json:.3f} | {base:.3f} | {opened:.3f} "
              f"| {base / view:.2f}x | {base / every:.2f}x | {base / as_json:.2f}x |")
    print(f"\nmedian of {args.repeat} runs each; every run opens the store afresh; "
          "ratio = baseline / ours (above 1: ours is faster)")


if __name__ == "__main__":
    main()
