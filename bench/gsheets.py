"""Benchmark: what the gsheets:// store costs in Sheets requests, against the local fake (tests/sheets_server.py).

1. Requests per completed trial. W worker processes run T trials each, the way runner/worker.py does
   (ask with learning_rate and batch_size, a "worker" attr, the lease's heartbeat from its thread (every 300 s
   on a sheet: runner/worker.py paces the spec's 60 s by the store's lease_timing),
   E reports with should_prune, a "result" attr, tell) plus the store's update_views at trial start, after each report and at the end, all under ONE shared
   service account; the notebooks start a fraction of a trial apart, as people start them. Time runs
   1/scale times faster than real (a 10-minute trial lasts 600*scale s; sync_s, settle_s, settle_max_s,
   views_s, heartbeat_s, Google's latency (tests/sheets_server.py google_latency: 0.15-0.5 s, 1 request in 20
   taking 1-3 s) and the quota window are scaled alike), so the counts are those of real time.
   From them: the largest number of workers that stays under 60 read and 60 write requests per minute
   per user, with one shared account and with one account per worker (then the project's 300 a minute
   binds).
   The training thread's store time is measured: the wall time of its store calls (ask, suggest, attrs, report,
   should_prune, tell, update_views; the heartbeat thread's beats count where the training thread waits for
   them). This machine's own cost per call does not shrink with the scale, so the same run is made first with
   no latency and settle_s 0 (the baseline, in real seconds: only this machine's cost), and the realistic run's
   store time is counted as baseline + (measured - baseline) / scale.
2. Opening a study of 1,000 finished trials (about 10 journal ops each) from the sheet: requests and
   seconds, each request taking what google_latency draws (unscaled, seeded), settle times as shipped.

    python bench/gsheets.py [--workers 4] [--trials 3] [--evals 4] [--scale 0.02]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sheets_server import FakeSheets, google_latency  # noqa: E402

from sweeper.leases import Heartbeat  # noqa: E402
from sweeper.storage import open_storage, open_store  # noqa: E402
from sweeper.storage.gsheets import backend_of  # noqa: E402
from sweeper.storage.gsheets.journal import JOURNAL, JOURNAL_HEADER  # noqa: E402

TRIAL_S = 600.0  # the trial the figures are for: 10 minutes
REAL = {"SYNC_S": 10.0, "SETTLE_S": 1.0, "SETTLE_MAX_S": 10.0, "VIEWS_S": 60.0, "HEARTBEAT_S": 300.0,
        "TIMEOUT_S": 30.0, "BACKOFF_S": 1.0, "BACKOFF_CAP_S": 32.0}
QUOTA_PER_USER, QUOTA_PER_PROJECT = 60, 300


class Stopwatch:
    """Seconds spent inside `with watch:` blocks."""

    def __init__(self) -> None:
        self.total = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.total += time.perf_counter() - self._t0


# ---------------------------------------------------------------------------------------------
# 1. Requests per trial


def env_for(fake: FakeSheets, account: dict, scale: float, settle: bool = True) -> dict[str, str]:
    env = {f"SWEEPER_GSHEETS_{k}": str(v * scale) for k, v in REAL.items()}
    if not settle:  # the baseline: this machine's own cost, nothing waited for
        env["SWEEPER_GSHEETS_SETTLE_S"] = "0"
    return {**env, "SWEEPER_GSHEETS_ENDPOINT": fake.url, "SWEEPER_GSHEETS_CREDENTIALS": json.dumps(account)}


def worker(url: str, env: dict[str, str], index: int, workers: int, trials: int, trial_s: float, evals: int,
           out) -> None:
    """One notebook: the runner's loop with a sleeping 'training' and the view updates."""
    os.environ.update(env)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(index)
    store = open_store(url, create=True)
    storage = store.storage
    study = optuna.load_study(study_name="bench", storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=index, constant_liar=True, multivariate=True,
                                                                 n_startup_trials=4),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2))
    backend = backend_of(storage)
    beat_s = store.lease_timing(trial_s * 60 / TRIAL_S)[0]  # the spec's 60 s, as the worker paces it on a sheet
    info = {"worker": f"acct{index}/{index:08x}", "account": f"acct{index}", "platform": "colab", "gpu": "Tesla T4",
            "trial": None, "gpu_hours": 0.0}
    time.sleep(trial_s * index / workers)  # notebooks are started one after another, not all at once
    per_trial, started = [], time.monotonic()
    for _ in range(trials):
        before, store_s, views_s = Counter(backend.stats), Stopwatch(), Stopwatch()
        with store_s:
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
            trial = study.ask()
            trial.suggest_float("learning_rate", 3e-5, 2e-3, log=True)
            trial.suggest_categorical("batch_size", [8, 16, 32])
            trial.set_user_attr("worker", {"id": info["worker"], "account": info["account"], "platform": "colab",
                                           "gpu": "Tesla T4"})
        heartbeat = Heartbeat(storage, trial._trial_id, {"worker": info["worker"]}, beat_s)
        with store_s, views_s:
            store.update_views(study, {**info, "trial": trial.number})
        loss, pruned = 2.5, False
        for k in range(1, evals + 1):
            time.sleep(trial_s / evals)  # training
            loss -= rng.uniform(0.05, 0.2)
            with store_s:
                trial.report(loss, k)
                pruned = trial.should_prune()
            info["gpu_hours"] = (time.monotonic() - started) / 3600
            with store_s, views_s:
                store.update_views(study, {**info, "trial": trial.number})
            if pruned:
                break
        heartbeat.stop()
        with store_s:
            trial.set_user_attr("result", {"wall_time_s": trial_s, "tokens_per_s": 1234.5, "steps": 100})
            study.tell(trial, None if pruned else loss, state=TrialState.PRUNED if pruned else TrialState.COMPLETE)
        with store_s, views_s:
            store.update_views(study, {**info, "trial": None})
        counts = Counter(backend.stats) - before
        per_trial.append((counts, store_s.total, views_s.total))
    out.put((index, per_trial))


def requests_per_trial(args: argparse.Namespace, realistic: bool = True) -> dict[str, Any]:
    """realistic: Google's latency and the settle times as shipped, scaled; else no latency and settle_s 0."""
    scale = args.scale
    with FakeSheets(latency=google_latency(scale) if realistic else (0.0, 0.0), read_quota=QUOTA_PER_USER,
                    write_quota=QUOTA_PER_USER, quota_window_s=60 * scale, record=True, seed=args.seed) as fake:
        account = fake.add_service_account()  # one service account shared by every worker
        url = f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}"
        env = env_for(fake, account, scale, settle=realistic)
        os.environ.update(env)
        optuna.create_study(study_name="bench", storage=open_storage(url, create=True))
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(url, env, i, args.workers, args.trials, TRIAL_S * scale, args.evals, out))
                 for i in range(args.workers)]
        t0 = time.time()
        for p in procs:
            p.start()
        results = [out.get(timeout=3600) for _ in procs]
        for p in procs:
            p.join()
        events = [e for e in fake.events if e[0] >= t0]
        quota_429 = fake.stats["429_quota"]
    trials = [t for _, per in results for t in per]
    total = sum((c for c, _, _ in trials), Counter())
    n = len(trials)
    window = 60 * scale
    peak = {kind: _peak([t for t, _, k in events if k == kind], window) for kind in ("reads", "writes")}
    return {"trials": n, "total": total, "per_trial": {k: total[k] / n for k in total}, "peak_per_min": peak,
            "quota_429": quota_429, "workers": args.workers, "store_s": sum(s for _, s, _ in trials) / n,
            "views_s": sum(v for _, _, v in trials) / n}


def _peak(times: list[float], window: float) -> int:
    times.sort()
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# ---------------------------------------------------------------------------------------------
# 2. Opening a study of 1,000 trials


class _Recorder(BaseJournalBackend):
    """Optuna's ops for a study, kept in memory, to write into the sheet in one go."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        return self.logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self.logs += json.loads(json.dumps(logs))


def journal_of(n_trials: int, evals: int) -> list[dict[str, Any]]:
    recorder, rng = _Recorder(), random.Random(0)
    study = optuna.create_study(study_name="big", storage=JournalStorage(recorder),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(n_trials):
        trial = study.ask()
        trial.suggest_float("learning_rate", 3e-5, 2e-3, log=True)
        trial.suggest_categorical("batch_size", [8, 16, 32])
        trial.set_user_attr("worker", {"id": f"w{i % 16}", "account": f"acct{i % 16}", "platform": "colab",
                                       "gpu": "Tesla T4"})
        for k in range(1, evals + 1):
            trial.report(2.5 - 0.1 * k + rng.uniform(-0.05, 0.05), k)
        trial.set_user_attr("result", {"wall_time_s": 600.0, "tokens_per_s": 1234.5, "steps": 100})
        study.tell(trial, 2.0 + rng.uniform(0, 0.5))
    return recorder.logs


def open_big_study(args: argparse.Namespace) -> dict[str, Any]:
    logs = journal_of(args.open_trials, args.evals)
    with FakeSheets(seed=args.seed) as fake:
        account = fake.add_service_account()
        url = f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}"
        os.environ.update(env_for(fake, account, 1.0))
        open_storage(url, create=True)  # prepares the worksheets
        rows = [JOURNAL_HEADER] + [[f"bench:{i}", "1/1", json.dumps(log, separators=(",", ":")), ""]
                                   for i, log in enumerate(logs)]
        with fake.lock:
            sheet = fake.spreadsheets[url[len("gsheets://"):]]["sheets"][JOURNAL]
            sheet.rows, sheet.row_count = rows, len(rows)
        fake.latency = google_latency(1.0)
        reads, tokens = fake.stats["reads"], fake.stats["tokens"]
        t0 = time.perf_counter()
        storage = open_storage(url, create=True)
        study = optuna.load_study(study_name="big", storage=storage)
        n = len(study.get_trials(deepcopy=False))
        seconds = time.perf_counter() - t0
        requests = fake.stats["reads"] - reads
        tokens = fake.stats["tokens"] - tokens
    chars = sum(len(r[2]) for r in rows[1:])
    return {"trials": n, "ops": len(logs), "chars": chars, "seconds": seconds, "requests": requests,
            "tokens": tokens, "latency_s": fake.stats["latency_ms"] / 1000}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=3, help="per worker")
    parser.add_argument("--evals", type=int, default=4, help="reports per trial")
    parser.add_argument("--scale", type=float, default=0.02, help="simulated seconds per real second")
    parser.add_argument("--open-trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1, help="of the fake's latency draws")
    parser.add_argument("--settle-max", type=float, default=REAL["SETTLE_MAX_S"],
                        help="SWEEPER_GSHEETS_SETTLE_MAX_S, real seconds (1: the settle time pinned at settle_s)")
    args = parser.parse_args()
    REAL["SETTLE_MAX_S"] = args.settle_max
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    base = requests_per_trial(args, realistic=False)
    r = requests_per_trial(args)
    per = r["per_trial"]
    reads, writes = per.get("reads", 0), per.get("writes", 0)
    views = per.get("views_requests", 0)
    minutes = TRIAL_S / 60
    shared = int(QUOTA_PER_USER * minutes // max(reads, writes))
    own_project = int(QUOTA_PER_PROJECT * minutes // max(reads, writes))
    one_per_second = int(60 * minutes // (reads + writes))

    def real_s(key: str) -> float:  # this machine's cost as measured, Google's latency and the waits unscaled
        return base[key] + max(0.0, r[key] - base[key]) / args.scale

    store_s, views_s = real_s("store_s"), real_s("views_s")
    settle_s = per.get("settle_wait_ms", 0) / 1000 / args.scale
    print(f"## Requests per completed trial ({r['trials']} trials by {r['workers']} workers, one shared account, "
          f"{args.evals} reports each, 10-minute trials simulated at x{1 / args.scale:.0f})\n")
    print("| per trial | reads | writes | of which views | settle waits | re-appends | 429s seen |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| mean | {reads:.1f} | {writes:.1f} | {views:.1f} | {per.get('settle_waits', 0):.1f} | "
          f"{per.get('reappends', 0):.2f} | {r['quota_429']} in the run |")
    print(f"| baseline run (no latency) | {base['per_trial'].get('reads', 0):.1f} | "
          f"{base['per_trial'].get('writes', 0):.1f} | {base['per_trial'].get('views_requests', 0):.1f} | "
          f"{base['per_trial'].get('settle_waits', 0):.1f} | {base['per_trial'].get('reappends', 0):.2f} | "
          f"{base['quota_429']} in the run |")
    print(f"\npeak per (simulated) minute for the shared account with {r['workers']} workers: "
          f"{r['peak_per_min']['reads']} reads, {r['peak_per_min']['writes']} writes")
    print(f"\nlargest number of workers under {QUOTA_PER_USER} requests/min/user, 10-minute trials:")
    print(f"- one shared service account: {shared}")
    print(f"- one account per worker, all in one Cloud project (300/min/project binds): {own_project}; "
          f"in separate projects: no per-user bound (each worker uses {max(reads, writes) / minutes:.1f}/min)")
    print(f"- Google's ~1 request/s per spreadsheet advice: {one_per_second}")
    print(f"\ntraining thread's store time per trial, Google's latency with its tails, settle time from "
          f"{REAL['SETTLE_S']:g} s growing up to {REAL['SETTLE_MAX_S']:g} s: "
          f"{store_s:.1f} s = {100 * store_s / TRIAL_S:.2f}% of a 10-minute trial (this machine's own cost, "
          f"measured without latency: {base['store_s']:.2f} s); of which view updates {views_s:.1f} s; "
          f"{store_s - views_s:.1f} s = {100 * (store_s - views_s) / TRIAL_S:.2f}% without them; settle waits "
          f"{settle_s:.1f} s (both threads)")

    o = open_big_study(args)
    print(f"\n## Opening a study of {o['trials']} trials ({o['ops']} journal ops, {o['chars'] / 1e6:.1f} M characters)\n")
    print(f"{o['requests']} read requests (+{o['tokens']} token request), {o['seconds']:.2f} s, of which "
          f"{o['latency_s']:.2f} s Google's latency (drawn, unscaled) and settle_s {REAL['SETTLE_S']:.0f} s")


if __name__ == "__main__":
    main()
