"""Concurrent `enqueue --grid` from several processes on one store leaves each grid point exactly once."""

from __future__ import annotations

import multiprocessing

from conftest import GRID_SIZE
from sweeper.spec import load_spec
from sweeper.study import create_study, enqueue, grid_points, load_study

WORKERS = 4


def enqueue_grid_when_all_are_ready(url: str, barrier, added) -> None:
    """One process: open the study, wait for the others, then enqueue the whole grid at once."""
    study, spec = load_study(url, "demo")
    barrier.wait(timeout=60)
    added.put(len(enqueue(study, url, grid_points(spec))))


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
