"""Benchmark: what the drive:// store costs a worker, against a local sqlite:// store measured in the same run.

1. Building the merged view: a folder of S shards x T finished trials (each with the params, 4 reports and
   the "worker" and "result" attrs a real worker writes), opened cold (what `sweeper report` and a joining
   worker pay) and re-read after one shard changed (what a worker pays per sync).
2. Latency per trial: ask, suggest two params, set the "worker" attr, E reports with should_prune, the
   "result" attr, tell; on the drive store with S other shards present (their merged view kept; one shard
   changing per trial as other workers would), against the same on a sqlite:// file on local disk.

    python bench/drive.py [--shards 20] [--trials 100] [--evals 4] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from sweeper.storage import open_storage
from sweeper.storage.drive import DriveStorage

RESULT = {"eval_loss": 1.5, "eval_losses": [2.0, 1.8, 1.6, 1.5], "train_loss": [[i, 2.0 - i / 100] for i in range(50)],
          "steps": 120, "tokens_per_s": 2400.0, "wall_time_s": 600.0, "gpu": "Tesla T4", "checkpoint": "/content/x"}


def run_trial(study: optuna.Study, evals: int) -> None:
    trial = study.ask()
    trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
    trial.suggest_categorical("batch_size", [8, 16, 32])
    trial.set_user_attr("worker", {"id": "w/1234", "account": "alice", "platform": "colab", "gpu": "Tesla T4"})
    for k in range(1, evals + 1):
        trial.report(2.0 - k / 10, k)
        trial.should_prune()
    trial.set_user_attr("result", RESULT)
    study.tell(trial, 1.5)


def make_folder(folder: Path, shards: int, trials: int, evals: int) -> None:
    for s in range(shards):
        storage = DriveStorage(folder, sync_s=3600)
        storage.shard_id = f"worker-{s:02d}"
        study = optuna.create_study(study_name="b", storage=storage) if s == 0 else optuna.load_study(study_name="b", storage=storage)
        study.sampler = optuna.samplers.RandomSampler(seed=s)
        for _ in range(trials):
            run_trial(study, evals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--evals", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-drive-"))
    folder = tmp / "sweep"
    started = time.perf_counter()
    make_folder(folder, args.shards, args.trials, args.evals)
    print(f"built {args.shards} shards x {args.trials} trials in {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    view = DriveStorage(folder, sync_s=0)
    cold = time.perf_counter() - started
    assert len(view.get_all_trials(0, deepcopy=False)) == args.shards * args.trials
    shard = folder / "worker-00.db"
    resyncs = []
    for _ in range(5):
        shard.write_bytes(shard.read_bytes())  # a new mtime: read again, as after a worker's publish
        started = time.perf_counter()
        view.sync()
        resyncs.append(time.perf_counter() - started)
    print(f"merged view: cold open {cold:.2f} s ({cold / args.shards * 1000:.0f} ms a shard); "
          f"re-read of one changed shard {statistics.median(resyncs) * 1000:.0f} ms")

    def per_trial(study: optuna.Study, touch: Path | None) -> float:
        times = []
        for _ in range(args.repeat):
            if touch is not None:
                touch.write_bytes(touch.read_bytes())
            started = time.perf_counter()
            run_trial(study, args.evals)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    sqlite_study = optuna.create_study(study_name="b", storage=open_storage(f"sqlite:///{tmp / 'local.db'}", create=True))
    sqlite_study.sampler = optuna.samplers.RandomSampler(seed=0)
    drive_storage = DriveStorage(folder, sync_s=0)
    drive_storage.shard_id = "me"
    drive_study = optuna.load_study(study_name="b", storage=drive_storage, sampler=optuna.samplers.RandomSampler(seed=0))
    base = per_trial(sqlite_study, None)
    drive = per_trial(drive_study, shard)
    print(f"store time per trial ({args.evals} reports): sqlite {base * 1000:.0f} ms, drive with "
          f"{args.shards} shards {drive * 1000:.0f} ms: {drive / base:.2f}x; added per ask on a 10-minute trial: "
          f"{max(drive - base, 0) / 600 * 100:.3f}%")


if __name__ == "__main__":
    main()
