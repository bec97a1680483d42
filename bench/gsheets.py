"""Benchmark: what the gsheets:// store costs in Sheets requests, against the local fake (tests/sheets_server.py).

1. Requests per completed trial. W worker processes run T trials each, the way runner/worker.py does
   (ask with learning_rate and batch_size, a "worker" attr, the lease's heartbeat from its thread (every 300 s
   on a sheet: runner/worker.py paces the spec's 60 s by sweeper.storage.lease_timing),
   E reports with should_prune, a "result" attr, tell) plus update_views at trial start, after each report and at the end, all under ONE shared
   service account; the notebooks start a fraction of a trial apart, as people start them. Time runs
   1/scale times faster than real (a 10-minute trial lasts 600*scale s; sync_s, settle_s, views_s,
   heartbeat_s, latency and the quota window are scaled alike), so the counts are those of real time.
   From them: the largest number of workers that stays under 60 read and 60 write requests per minute
   per user, with one shared account and with one account per worker (then the project's 300 a minute
   binds), and the store's wall-clock time per trial at modelled Google latency.
2. Opening a study of 1,000 finished trials (about 10 journal ops each) from the sheet: requests and
   seconds, with each request taking `--open-latency` seconds as Google's would.

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
from sheets_server import FakeSheets  # noqa: E402

from sweeper.leases import Heartbeat  # noqa: E402
from sweeper.storage import lease_timing, open_storage  # noqa: E402
from sweeper.storage.gsheets import JOURNAL, JOURNAL_HEADER, backend_of, update_views  # noqa: E402

TRIAL_S = 600.0  # the trial the figures are for: 10 minutes
REAL = {"SYNC_S": 10.0, "SETTLE_S": 1.0, "VIEWS_S": 60.0, "HEARTBEAT_S": 300.0, "TIMEOUT_S": 30.0,
        "BACKOFF_S": 1.0, "BACKOFF_CAP_S": 32.0}
LATENCY_S = (0.15, 0.5)  # a Sheets request as seen from Colab, for the modelled overhead
QUOTA_PER_USER, QUOTA_PER_PROJECT = 60, 300


# ---------------------------------------------------------------------------------------------
# 1. Requests per trial


def env_for(fake: FakeSheets, account: dict, scale: float) -> dict[str, str]:
    env = {f"SWEEPER_GSHEETS_{k}": str(v * scale) for k, v in REAL.items()}
    return {**env, "SWEEPER_GSHEETS_ENDPOINT": fake.url, "SWEEPER_GSHEETS_CREDENTIALS": json.dumps(account)}


def worker(url: str, env: dict[str, str], index: int, workers: int, trials: int, trial_s: float, evals: int,
           out) -> None:
    """One notebook: the runner's loop with a sleeping 'training' and the view updates."""
    os.environ.update(env)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(index)
    storage = open_storage(url)
    study = optuna.load_study(study_name="bench", storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=index, constant_liar=True, multivariate=True,
                                                                 n_startup_trials=4),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2))
    backend = backend_of(storage)
    beat_s = lease_timing(storage, trial_s * 60 / TRIAL_S)[0]  # the spec's 60 s, as the worker paces it on a sheet
    info = {"worker": f"acct{index}/{index:08x}", "account": f"acct{index}", "platform": "colab", "gpu": "Tesla T4",
            "trial": None, "gpu_hours": 0.0}
    time.sleep(trial_s * index / workers)  # notebooks are started one after another, not all at once
    per_trial, started = [], time.monotonic()
    for _ in range(trials):
        before = Counter(backend.stats)
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        trial = study.ask()
        trial.suggest_float("learning_rate", 3e-5, 2e-3, log=True)
        trial.suggest_categorical("batch_size", [8, 16, 32])
        trial.set_user_attr("worker", {"id": info["worker"], "account": info["account"], "platform": "colab",
                                       "gpu": "Tesla T4"})
        heartbeat = Heartbeat(storage, trial._trial_id, {"worker": info["worker"]}, beat_s)
        update_views(storage, study, {**info, "trial": trial.number})
        loss, pruned = 2.5, False
        for k in range(1, evals + 1):
            time.sleep(trial_s / evals)  # training
            loss -= rng.uniform(0.05, 0.2)
            trial.report(loss, k)
            pruned = trial.should_prune()
            info["gpu_hours"] = (time.monotonic() - started) / 3600
            update_views(storage, study, {**info, "trial": trial.number})
            if pruned:
                break
        heartbeat.stop()
        trial.set_user_attr("result", {"wall_time_s": trial_s, "tokens_per_s": 1234.5, "steps": 100})
        study.tell(trial, None if pruned else loss, state=TrialState.PRUNED if pruned else TrialState.COMPLETE)
        update_views(storage, study, {**info, "trial": None})
        per_trial.append(Counter(backend.stats) - before)
    out.put((index, per_trial))


def requests_per_trial(args: argparse.Namespace) -> dict[str, Any]:
    scale = args.scale
    with FakeSheets(latency=(LATENCY_S[0] * scale, LATENCY_S[1] * scale), read_quota=QUOTA_PER_USER,
                    write_quota=QUOTA_PER_USER, quota_window_s=60 * scale, record=True) as fake:
        account = fake.add_service_account()  # one service account shared by every worker
        url = f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}"
        env = env_for(fake, account, scale)
        os.environ.update(env)
        optuna.create_study(study_name="bench", storage=open_storage(url))
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
    total = sum(trials, Counter())
    n = len(trials)
    window = 60 * scale
    peak = {kind: _peak([t for t, _, k in events if k == kind], window) for kind in ("reads", "writes")}
    return {"trials": n, "total": total, "per_trial": {k: total[k] / n for k in total}, "peak_per_min": peak,
            "quota_429": quota_429, "workers": args.workers}


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
    with FakeSheets() as fake:
        account = fake.add_service_account()
        url = f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}"
        os.environ.update(env_for(fake, account, 1.0))
        open_storage(url)  # prepares the worksheets
        rows = [JOURNAL_HEADER] + [[f"bench:{i}", "1/1", json.dumps(log, separators=(",", ":")), ""]
                                   for i, log in enumerate(logs)]
        with fake.lock:
            fake.spreadsheets[url[len("gsheets://"):]]["sheets"][JOURNAL].rows = rows
        fake.latency = (args.open_latency, args.open_latency)
        reads, tokens = fake.stats["reads"], fake.stats["tokens"]
        t0 = time.perf_counter()
        storage = open_storage(url)
        study = optuna.load_study(study_name="big", storage=storage)
        n = len(study.get_trials(deepcopy=False))
        seconds = time.perf_counter() - t0
        requests = fake.stats["reads"] - reads
        tokens = fake.stats["tokens"] - tokens
    chars = sum(len(r[2]) for r in rows[1:])
    return {"trials": n, "ops": len(logs), "chars": chars, "seconds": seconds, "requests": requests,
            "tokens": tokens, "latency": args.open_latency}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=3, help="per worker")
    parser.add_argument("--evals", type=int, default=4, help="reports per trial")
    parser.add_argument("--scale", type=float, default=0.02, help="simulated seconds per real second")
    parser.add_argument("--open-trials", type=int, default=1000)
    parser.add_argument("--open-latency", type=float, default=0.3, help="seconds per request when opening")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    r = requests_per_trial(args)
    per = r["per_trial"]
    reads, writes = per.get("reads", 0), per.get("writes", 0)
    views = per.get("views_requests", 0)
    minutes = TRIAL_S / 60
    shared = int(QUOTA_PER_USER * minutes // max(reads, writes))
    own_project = int(QUOTA_PER_PROJECT * minutes // max(reads, writes))
    one_per_second = int(60 * minutes // (reads + writes))
    request_s = sum(LATENCY_S) / 2
    overhead = (reads + writes) * request_s + per.get("settle_waits", 0) * REAL["SETTLE_S"]
    journal_only = overhead - views * request_s
    print(f"## Requests per completed trial ({r['trials']} trials by {r['workers']} workers, one shared account, "
          f"{args.evals} reports each, 10-minute trials simulated at x{1 / args.scale:.0f})\n")
    print("| per trial | reads | writes | of which views | settle waits | re-appends | 429s seen |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| mean | {reads:.1f} | {writes:.1f} | {views:.1f} | {per.get('settle_waits', 0):.1f} | "
          f"{per.get('reappends', 0):.2f} | {r['quota_429']} in the run |")
    print(f"\npeak per (simulated) minute for the shared account with {r['workers']} workers: "
          f"{r['peak_per_min']['reads']} reads, {r['peak_per_min']['writes']} writes")
    print(f"\nlargest number of workers under {QUOTA_PER_USER} requests/min/user, 10-minute trials:")
    print(f"- one shared service account: {shared}")
    print(f"- one account per worker, all in one Cloud project (300/min/project binds): {own_project}; "
          f"in separate projects: no per-user bound (each worker uses {max(reads, writes) / minutes:.1f}/min)")
    print(f"- Google's ~1 request/s per spreadsheet advice: {one_per_second}")
    print(f"\nstore time per trial at {LATENCY_S[0]}-{LATENCY_S[1]} s a request and settle_s "
          f"{REAL['SETTLE_S']:.0f} s: {overhead:.1f} s = {100 * overhead / TRIAL_S:.2f}% of a 10-minute trial; "
          f"{journal_only:.1f} s = {100 * journal_only / TRIAL_S:.2f}% without the view updates "
          "(which the worker can make off its training thread)")

    o = open_big_study(args)
    print(f"\n## Opening a study of {o['trials']} trials ({o['ops']} journal ops, {o['chars'] / 1e6:.1f} M characters)\n")
    print(f"{o['requests']} read requests (+{o['tokens']} token request), {o['seconds']:.2f} s at "
          f"{o['latency']} s per request, settle_s {REAL['SETTLE_S']:.0f} s included")


if __name__ == "__main__":
    main()
