"""Chaos: worker processes killed (SIGKILL) at random times and replaced, on every shared store.

Each run: WORKERS worker processes (tests/fast_trainer.py: the real worker loop, trials of a second or two,
checkpoints every CHECKPOINT_EVERY steps) on a sweep of N_TRIALS trials, two of them enqueued; a killer
sends SIGKILL to a random worker KILLS times, at random moments, starting a replacement each time.
At the end, from the store:
- every finished trial has exactly one COMPLETE (or PRUNED) record: no lineage (a trial and the trials
  resuming it) finished twice, and no enqueued point finished twice;
- every trial whose worker died was taken over (failed as stale) and resumed exactly once (a resume may
  die and be resumed in turn), from its checkpoint: steps redone <= the checkpoint interval;
- no RUNNING trial is left, and complete + pruned trials = the budget.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import tomli_w
from fast_trainer import CHECKPOINT_EVERY
from optuna.trial import TrialState
from synced_folder import SyncedFolders
from test_cli import sweeper

from sweeper.leases import NOT_RETRIED, grace_s
from sweeper.record import LEASE, RESUMES, TAKEOVER, trial_key, worker_of
from sweeper.storage import open_store, open_storage
from sweeper.storage.drive import duplicate_claims

TESTS = Path(__file__).parents[1]
WORKERS, KILLS, N_TRIALS = 3, 3, 12
HEARTBEAT_S = 0.3
STEP_S, STEPS = 0.15, 8
ENV = {"FAST_TRAINER_STEP_S": str(STEP_S), "FAST_TRAINER_STEPS": str(STEPS), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def gsheets_store(monkeypatch):
    """A sheet on the fake Sheets server, with Google's latency (tails included) scaled as in test_gsheets.py; the
    test injects 429s, 500s, 408s and timeouts into one request in ten."""
    from sheets_server import FakeSheets, google_latency
    from test_gsheets import LATENCY_SCALE, use, worker_env

    with FakeSheets(latency=google_latency(LATENCY_SCALE), fault_rate=0.0, faults=("500", "429", "408", "timeout"),
                    hang_s=0.4, read_quota=40, write_quota=40, quota_window_s=0.5, seed=3) as fake:
        account = fake.add_service_account()
        env = worker_env(fake, account, SWEEPER_GSHEETS_SETTLE_S="0.1", SWEEPER_GSHEETS_SETTLE_MAX_S="0.2",
                         SWEEPER_GSHEETS_TIMEOUT_S="0.3",
                         SWEEPER_GSHEETS_BACKOFF_S="0.05", SWEEPER_GSHEETS_BACKOFF_CAP_S="0.5",
                         SWEEPER_GSHEETS_SYNC_S="0.2", SWEEPER_GSHEETS_HEARTBEAT_S=str(HEARTBEAT_S))
        use(monkeypatch, env)
        yield f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}", env, fake


@pytest.mark.parametrize("kind", ["journal", "sqlite", "postgresql", "gsheets", "drive"])
def test_killed_workers_lose_nothing_and_finish_the_budget(kind, tmp_path, spec_table, request, capsys, monkeypatch):
    env, fake, folders, heartbeat_s = dict(os.environ, **ENV), None, None, HEARTBEAT_S
    if kind == "journal":
        url = f"journal:///{tmp_path / 'sweep.log'}"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'sweep.db'}"
    elif kind == "postgresql":
        url = request.getfixturevalue("pg_store")
    elif kind == "gsheets":
        url, sheet_env, fake = request.getfixturevalue("gsheets_store")
        env.update(sheet_env)
    else:  # each machine sees its own copy of the folder; files reach the others 0-0.3 s late, out of order
        folders = SyncedFolders(tmp_path / "machines", ["laptop", *(f"w{i}" for i in range(WORKERS + KILLS))],
                                max_delay_s=0.3, seed=11)
        url = f"drive://{folders.copies['laptop']}"
        drive_env = {"SWEEPER_DRIVE_SETTLE_S": "0.2", "SWEEPER_DRIVE_SYNC_S": "0.1", "SWEEPER_DRIVE_LAG_S": "0.4"}
        env.update(drive_env)
        for name, value in drive_env.items():  # this process too: it computes the workers' grace below
            monkeypatch.setenv(name, value)
    spec_table.update(n_trials=N_TRIALS, heartbeat_s=heartbeat_s)
    spec_table["budget"]["evals"] = 4
    spec_file = tmp_path / "sweep.toml"
    spec_file.write_text(tomli_w.dumps(spec_table))
    assert sweeper("init", spec_file, "--store", url).exit_code == 0
    enqueued = ["learning_rate=0.0001,batch_size=8", "learning_rate=0.001,batch_size=16"]
    assert sweeper("enqueue", "--store", url, "--point", enqueued[0], "--point", enqueued[1]).exit_code == 0
    if fake is not None:
        fake.fault_rate = 0.1
    if folders is not None:
        folders.settle()

    checkpoints = tmp_path / "checkpoints"  # shared by every worker, as a Drive folder or a lab disk would be
    rng = random.Random(kind)

    def start(i: int) -> subprocess.Popen:
        store = url if folders is None else f"drive://{folders.copies[f'w{i}']}"
        return subprocess.Popen([sys.executable, str(TESTS / "fast_trainer.py"), "--store", store, "--study", "demo",
                                 "--account", f"w{i}", "--checkpoint-root", str(checkpoints)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [start(i) for i in range(WORKERS)]
    killed_at: dict[str, float] = {}  # account of a killed worker -> wall time of the kill
    kills, deadline = 0, time.monotonic() + 150
    while kills < KILLS and time.monotonic() < deadline:
        time.sleep(rng.uniform(1.0, 2.0))
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            break
        victim = rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        killed_at[f"w{procs.index(victim)}"] = time.time()
        victim.wait()
        kills += 1
        procs.append(start(len(procs)))
    outputs = [p.communicate(timeout=max(1, deadline - time.monotonic()))[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes.count(-signal.SIGKILL) == kills and codes.count(0) == len(procs) - kills, "\n".join(outputs)
    if fake is not None:
        fake.fault_rate = 0.0
    if folders is not None:
        folders.settle()
        folders.stop()

    trials = optuna.load_study(study_name="demo", storage=open_storage(url)).get_trials(deepcopy=False)
    by_key = {trial_key(t): t for t in trials}
    duplicates = duplicate_claims(trials)  # drive: claims that raced all the way to the end, marked in the report

    def root(t: optuna.trial.FrozenTrial) -> int:
        while RESUMES in t.user_attrs:
            t = by_key[t.user_attrs[RESUMES]]
        return t.number

    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    left = [(t.number, t.state.name, t.user_attrs, t.system_attrs) for t in trials if not t.state.is_finished()]
    assert not left, left
    if kind == "drive":  # workers asking in the same lag window each see room for one more (README)
        assert N_TRIALS <= len(finished) - len(duplicates) < N_TRIALS + WORKERS
    else:
        assert len(finished) == N_TRIALS  # the budget, exactly
    lineages = Counter(root(t) for t in finished if t.number not in duplicates)
    twice = [(t.number, t.state.name, t.user_attrs.get(RESUMES), t.user_attrs.get("stale_reason"),
              t.user_attrs.get("result", {}).get("fail_reason"), t.user_attrs.get("worker", {}).get("id"))
             for t in trials if lineages.get(root(t), 0) > 1]
    assert not twice, twice  # no lineage finished twice
    points = Counter(tuple(sorted(t.params.items())) for t in finished if "fixed_params" in t.system_attrs
                     and RESUMES not in t.user_attrs and t.number not in duplicates)
    assert all(n == 1 for n in points.values())  # no enqueued point finished twice

    failed = [t.user_attrs.get("stale_reason") or t.user_attrs["result"]["fail_reason"] for t in trials
              if t.state == TrialState.FAIL]
    stale = [t for t in trials if t.state == TrialState.FAIL and "stale_reason" in t.user_attrs]
    surplus = sum(reason.startswith("surplus: ") for reason in failed)  # asked at once for the last place, or a
    # second taker's resume
    lost = sum(reason.startswith("claim lost: ") for reason in failed)  # drive: another claim on the point won
    assert len(stale) + surplus + lost == len(failed), failed  # nothing else failed
    resumed = Counter(t.user_attrs[RESUMES] for t in trials if RESUMES in t.user_attrs and t.number not in duplicates
                      and not t.user_attrs.get("result", {}).get("fail_reason", "").startswith(NOT_RETRIED))
    assert all(resumed[trial_key(t)] == 1 for t in stale) and sum(resumed.values()) == len(stale)
    assert len(stale) <= kills  # a killed worker leaves at most its one running trial
    redone = []
    for t in trials:
        if RESUMES in t.user_attrs and t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            old = by_key[t.user_attrs[RESUMES]]
            progress = Path(old.system_attrs.get(LEASE, {}).get("checkpoint", "/nonexistent")) / "progress"
            reached = int(progress.read_text()) if progress.exists() else 0  # killed before its first step
            redone.append(reached - t.user_attrs["result"]["resumed_from_step"])
    assert all(0 <= r <= CHECKPOINT_EVERY for r in redone), redone
    # Kill to takeover, by wall time on this machine: the taker records when it took the trial over.
    # A trial killed before its first beat or its worker attr names no worker: it is left out of the figure.
    owners = {t.number: (t.system_attrs.get(LEASE, {}).get("worker") or worker_of(t).get("id") or "?").split("/")[0]
              for t in stale}
    to_takeover = sorted(t.user_attrs[TAKEOVER]["at"] - killed_at[owners[t.number]] for t in stale
                         if owners[t.number] in killed_at)
    grace = grace_s(*open_store(url).lease_timing(heartbeat_s))
    with capsys.disabled():
        if to_takeover:
            print(f"\n[chaos {kind}] kill to takeover: median {statistics.median(to_takeover):.1f} s, max "
                  f"{to_takeover[-1]:.1f} s; grace {grace:.1f} s, heartbeat {heartbeat_s} s, trial "
                  f"{STEPS * STEP_S:.1f} s of training", end="")
        faults = f", faults injected {sum(fake.stats[f'fault_{k}'] for k in fake.faults)}" if fake else ""
        print(f"\n[chaos {kind}] kills {kills}, takeovers {len(stale)}, steps redone {sum(redone)} "
              f"(at most {CHECKPOINT_EVERY} each), surplus starts {surplus}, claims lost {lost}, duplicates "
              f"{len(duplicates)}, trials {len(trials)}{faults}")
