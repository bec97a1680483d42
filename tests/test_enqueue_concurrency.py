"""Concurrent `enqueue --grid` from several processes on one store leaves each grid point exactly once; four workers
claiming one enqueued point at once leave it to exactly one of them."""

from __future__ import annotations

import multiprocessing
import shutil
import threading

import pytest
from optuna.trial import TrialState

from conftest import GRID_SIZE
from sweeper.spec import load_spec
from sweeper.storage import open_store
from sweeper.study import create_study, enqueue, grid_points, load_study

WORKERS = 4


def enqueue_grid_when_all_are_ready(url: str, barrier, added) -> None:
    """One process: open the study, wait for the others, then enqueue the whole grid at once."""
    store = open_store(url)
    study, spec = load_study(store, "demo")
    barrier.wait(timeout=60)
    added.put(len(enqueue(study, store, grid_points(spec))))


def test_four_processes_enqueueing_the_grid_at_once_leave_one_trial_per_point(spec_toml, store_url):
    spec = load_spec(spec_toml)
    create_study(spec, store_url)
    # fork: the children start in milliseconds; each opens its own storage, none inherits a connection.
    ctx = multiprocessing.get_context("fork")
    barrier, added = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=enqueue_grid_when_all_are_ready, args=(store_url, barrier, added)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    counts = sorted(added.get(timeout=5) for _ in range(WORKERS))
    assert sum(counts) == GRID_SIZE

    study, _ = load_study(store_url, "demo")
    enqueued = [t.system_attrs["fixed_params"] for t in study.trials]
    expected = grid_points(spec)
    assert len(enqueued) == len(expected) == GRID_SIZE
    assert sorted(enqueued, key=lambda p: (p["learning_rate"], p["batch_size"])) == \
        sorted(expected, key=lambda p: (p["learning_rate"], p["batch_size"]))


# ---------------------------------------------------------------------------------------------
# Claiming an enqueued point: exactly one worker runs it, however their reads and writes interleave.

CLAIMERS = 4
ALL_READ_S = 2.0  # how long a claimer waits, between its read and its write, for the others to read too


def claim_once(url: str, start, all_read, claimed) -> None:
    """One worker: ask for a trial once, with the read of the enqueued trial's state held open until every other
    worker has read it too (or ALL_READ_S has passed: they cannot, because a lock keeps them out)."""
    from optuna.storages._rdb import models

    read = models.TrialModel.find_or_raise_by_id.__func__
    waited = []

    def read_then_wait_for_the_others(cls, trial_id, session, for_update=False):
        trial = read(cls, trial_id, session, for_update)
        if for_update and trial.state == TrialState.WAITING and not waited:
            waited.append(True)
            try:
                all_read.wait(timeout=ALL_READ_S)  # the widest race Optuna's pop allows: everyone read WAITING
            except threading.BrokenBarrierError:
                pass
        return trial

    models.TrialModel.find_or_raise_by_id = classmethod(read_then_wait_for_the_others)
    store = open_store(url)
    study, spec = load_study(store, "demo")
    start.wait(timeout=60)
    trial = study.ask()
    fixed = study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params", {})
    claimed.put((trial._trial_id, dict(fixed)))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_enqueued_point_is_claimed_by_one_of_four_workers_reading_it_at_once(spec_toml, tmp_path, kind, request,
                                                                                 empty_sqlite_db):
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'sweep.db'}"
        shutil.copyfile(empty_sqlite_db, tmp_path / "sweep.db")
    else:
        url = request.getfixturevalue("pg_store")
    study, _ = create_study(load_spec(spec_toml), url)
    point = {"learning_rate": 2e-4, "batch_size": 8}
    enqueue(study, open_store(url), [point])
    ctx = multiprocessing.get_context("fork")
    start, all_read, claimed = ctx.Barrier(CLAIMERS), ctx.Barrier(CLAIMERS), ctx.Queue()
    procs = [ctx.Process(target=claim_once, args=(url, start, all_read, claimed)) for _ in range(CLAIMERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * CLAIMERS
    got = [claimed.get(timeout=5) for _ in range(CLAIMERS)]
    enqueued_id = study.trials[0]._trial_id
    assert [fixed for trial_id, fixed in got if trial_id == enqueued_id] == [point]  # one worker runs the point
    assert len({trial_id for trial_id, _ in got}) == CLAIMERS  # the others each got a trial of their own
    trials = load_study(url, "demo")[0].trials
    assert len(trials) == CLAIMERS and all(t.state == TrialState.RUNNING for t in trials)
