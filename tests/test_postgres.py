"""The postgresql:// store against a real PostgreSQL server (tests/pg_server.py): the CLI, concurrent enqueue,
the store lock, and errors that never show the password.

Each test gets a fresh database on the session's server. Without PostgreSQL installed the tests that need
the server are skipped (CI sets SWEEPER_REQUIRE_POSTGRES=1, which turns that into an error).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import threading

import optuna
import psycopg2
import pytest
from click.testing import CliRunner, Result
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from pg_server import PASSWORD, free_port
from test_enqueue_concurrency import WORKERS, enqueue_grid_when_all_are_ready

from conftest import GRID_SIZE
from sweeper.cli import cli
from sweeper.errors import SweeperError
from sweeper.spec import load_spec
from sweeper.storage import open_storage, store_lock
from sweeper.study import create_study, grid_points, load_study, suggest


def sql(url: str, query: str) -> list[tuple]:
    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall() if cur.description else []


def sweeper(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result: Result) -> str:
    """The single `Error: ...` line a failing command prints, with nothing on stdout."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The CLI on a postgresql:// store


def test_init_enqueue_grid_report_and_best_on_postgres(spec_toml, pg_store):
    init = sweeper("init", spec_toml, "--store", pg_store)
    assert init.exit_code == 0, init.output
    assert init.stdout == "demo\n" and "study 'demo': created" in init.stderr

    first = sweeper("enqueue", "--store", pg_store, "--grid")
    assert first.exit_code == 0, first.output
    assert f"enqueued {GRID_SIZE} of {GRID_SIZE} points (0 already present)" in first.stderr
    again = sweeper("enqueue", "--store", pg_store, "--grid")
    assert f"enqueued 0 of {GRID_SIZE} points ({GRID_SIZE} already present)" in again.stderr

    spec = load_spec(spec_toml)
    rows = json.loads(sweeper("report", "--store", pg_store, "--json").stdout)
    assert [r["state"] for r in rows] == ["WAITING"] * GRID_SIZE
    assert [r["params"] for r in rows] == grid_points(spec)

    study, spec = load_study(pg_store, None)  # a worker's claim -> report -> tell, on the server
    trial = study.ask()
    assert suggest(trial, spec) == grid_points(spec)[0]
    trial.report(1.6, 1)
    study.tell(trial, 1.5)

    table = sweeper("report", "--store", pg_store)
    assert table.exit_code == 0 and "complete 1  ▓ pruned 0  ▒ running 0  ░ queued 5  · left 0" in table.stdout
    assert "queued 2 beyond the budget" in table.stdout  # the grid's 8 points, in a budget of 6
    best = sweeper("best", "--store", pg_store, "--json")
    assert best.exit_code == 0, best.output
    config = json.loads(best.stdout)
    assert config["best_trial"] == 0 and config["eval_loss"] == 1.5
    assert config["train"]["learning_rate"] == grid_points(spec)[0]["learning_rate"]
    assert all(PASSWORD not in r.output for r in (init, first, again, table, best))


def test_a_bare_postgresql_url_opens_with_psycopg2(pg_store):
    assert pg_store.startswith("postgresql://")
    storage = open_storage(pg_store)
    assert storage.engine.dialect.driver == "psycopg2"
    optuna.create_study(study_name="s", storage=storage)
    explicit = open_storage(pg_store.replace("postgresql://", "postgresql+psycopg2://", 1))
    assert optuna.get_all_study_names(explicit) == ["s"]


# ---------------------------------------------------------------------------------------------
# Concurrent enqueue and the store lock


def test_four_processes_enqueueing_the_grid_at_once_leave_one_trial_per_point(spec_toml, pg_store):
    spec = load_spec(spec_toml)
    ctx = multiprocessing.get_context("fork")
    # The study is made in a child too: the parent then holds no connection that a forked worker would inherit.
    init = ctx.Process(target=create_study, args=(spec, pg_store))
    init.start()
    init.join(timeout=60)
    assert init.exitcode == 0
    barrier, added = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=enqueue_grid_when_all_are_ready, args=(pg_store, barrier, added))
             for _ in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    assert sum(added.get(timeout=5) for _ in range(WORKERS)) == GRID_SIZE

    enqueued = [t.system_attrs["fixed_params"] for t in load_study(pg_store, "demo")[0].trials]
    key = lambda p: (p["learning_rate"], p["batch_size"])  # noqa: E731
    assert sorted(enqueued, key=key) == sorted(grid_points(spec), key=key)


def advisory_locks(url: str) -> int:
    return sql(url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")[0][0]


def lock_once(url: str, granted: threading.Event) -> None:
    with store_lock(url):
        granted.set()


def test_store_lock_holds_off_other_connections_until_released_even_by_an_error(pg_store):
    granted = threading.Event()
    other = threading.Thread(target=lock_once, args=(pg_store, granted), daemon=True)
    with pytest.raises(RuntimeError, match="boom"):
        with store_lock(pg_store):
            assert advisory_locks(pg_store) == 1
            other.start()
            assert not granted.wait(0.5), "a second client got the lock while it was held"
            raise RuntimeError("boom")
    assert granted.wait(10), "the lock was not released when the block raised"
    other.join(timeout=10)
    assert advisory_locks(pg_store) == 0


def hold_the_lock_forever(url: str, locked) -> None:
    with store_lock(url):
        locked.set()
        threading.Event().wait()


def test_store_lock_of_a_killed_process_is_released_by_the_server(pg_store):
    ctx = multiprocessing.get_context("fork")
    locked = ctx.Event()
    holder = ctx.Process(target=hold_the_lock_forever, args=(pg_store, locked))
    holder.start()
    try:
        assert locked.wait(30)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a notebook VM gone mid-enqueue
        holder.join(timeout=10)
    granted = threading.Event()
    threading.Thread(target=lock_once, args=(pg_store, granted), daemon=True).start()
    assert granted.wait(10), "the lock of a dead process was never released"


def test_store_lock_with_a_wrong_password_fails_without_showing_it(pg_store):
    with pytest.raises(SweeperError) as caught:
        with store_lock(pg_store.replace(f":{PASSWORD}@", ":wrong-pw@")):
            pass
    message = str(caught.value)
    assert message.startswith("cannot lock store postgresql://sweeper:***@127.0.0.1:")
    assert "wrong-pw" not in message and PASSWORD not in message


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 1, never the password


@pytest.mark.parametrize("command", ["init", "enqueue", "report"])
def test_a_wrong_password_is_one_line_and_exit_1_without_the_password(spec_toml, postgres_url, command):
    bad = postgres_url.replace(f":{PASSWORD}@", ":wrong-pw@")
    args = {"init": ["init", spec_toml], "enqueue": ["enqueue", "--grid"], "report": ["report"]}[command]
    result = sweeper(*args, "--store", bad)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert f"cannot open store {bad.replace(':wrong-pw@', ':***@')}: " in line
    assert 'password authentication failed for user "sweeper"' in line
    assert "wrong-pw" not in result.output and PASSWORD not in result.output


def test_an_unreachable_server_is_one_line_and_exit_1_without_the_password():
    url = f"postgresql://sweeper:{PASSWORD}@127.0.0.1:{free_port()}/sweeps"  # nothing listens there
    result = sweeper("report", "--store", url)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert f"cannot open store {url.replace(f':{PASSWORD}@', ':***@')}: " in line
    assert PASSWORD not in result.output
    with pytest.raises(SweeperError) as caught:
        with store_lock(url):
            pass
    message = str(caught.value)
    assert message.startswith("cannot lock store postgresql://sweeper:***@") and PASSWORD not in message


def test_a_server_that_never_answers_times_out_in_one_line(monkeypatch):
    """A host that takes the connection and says nothing (a firewall, a paused VM): libpq alone would wait forever."""
    import socket
    import time

    monkeypatch.setenv("SWEEPER_CONNECT_TIMEOUT_S", "2")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever reads or writes
        url = f"postgresql://sweeper:{PASSWORD}@127.0.0.1:{silent.getsockname()[1]}/sweeps"
        for attempt in (lambda: open_storage(url), lambda: store_lock(url).__enter__()):
            started = time.monotonic()
            with pytest.raises(SweeperError, match=r"^cannot (open|lock) store postgresql://sweeper:\*\*\*@.*timeout"):
                attempt()
            assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------------------
# Optuna's own heartbeat (RDB only) works on PostgreSQL too


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_optuna_heartbeat_fails_a_silent_trial_on_postgres(pg_store):
    storage = RDBStorage(pg_store.replace("postgresql://", "postgresql+psycopg2://", 1), heartbeat_interval=60)
    study = optuna.create_study(study_name="hb", storage=storage)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    storage.record_heartbeat(trial._trial_id)  # the second one updates the row
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING
    sql(pg_store, "UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 hour'")  # an hour of silence
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.FAIL
