"""One contract over every store: Optuna's own storage suite, then what sweeper itself relies on.

Stores: sqlite (a file), journal (a journal file), postgresql (the session's real server), gsheets (the fake
Sheets server, in its serialized and its racy append mode) and drive (a folder). Our guarantees, each run on
every store: an enqueued point runs once under concurrent workers, exactly one of two racing takeovers of a
stale trial succeeds, read-your-writes, and the storage pickles.

What a store does differently by design is written once, in DEVIATIONS: each entry is a strict xfail, so the
table documents the differences and a deviation that goes away fails the suite until the table says so.

Nothing here waits on a timer: races are forced by barriers (and on the racy sheet by the fake's `race`, every
racing append aimed at one row), and no sync interval needs to be "long enough". The one timing assumption is the
racy sheet's settle_s (0.01 s, as in test_gsheets): the fake's appends land within microseconds of picking a row.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import TrialState
from sheets_server import FakeSheets

from sweeper.errors import SweeperError
from sweeper.leases import hand_over
from sweeper.storage import open_storage

STORES = ["sqlite", "journal", "postgresql", "gsheets-serialized", "gsheets-racy", "drive"]
KINDS = {store.split("-")[0] for store in STORES}

# ---------------------------------------------------------------------------------------------
# Every deviation a store has by design: (store or store kind, test name) -> why. Each is a strict xfail.

_DRIVE_DELETE = ("a drive:// study cannot be deleted (UserError): its records live in every worker's shard, "
                 "and no worker may write another's")
_DRIVE_ORIGIN = ("every trial in a drive view carries its origin, a system attr (sweeper.record.ORIGIN, "
                 "'<shard>#<number>'): it names the trial's record across views whose trial numbers are each their own")
DEVIATIONS: dict[tuple[str, str], str] = {
    ("drive", "test_create_new_study_unique_id"): _DRIVE_DELETE,
    ("drive", "test_delete_study"): _DRIVE_DELETE,
    ("drive", "test_delete_study_after_create_multiple_studies"): _DRIVE_DELETE,
    ("drive", "test_create_new_trial"): _DRIVE_ORIGIN,
    ("drive", "test_create_new_trial_with_template_trial"): _DRIVE_ORIGIN,
    ("drive", "test_get_trial"): _DRIVE_ORIGIN,
    ("drive", "test_get_all_trials"): _DRIVE_ORIGIN,
    ("drive", "test_get_trial_system_attrs"): _DRIVE_ORIGIN,
    ("drive", "test_set_trial_system_attr"): _DRIVE_ORIGIN,
    ("drive", "test_an_enqueued_point_runs_once_under_concurrent_workers"): (
        "a drive pop is never refused: each worker claims the point in its own shard, and of the claims it sees "
        "after settle_s (here 0) the lowest shard wins; a worker that claimed before a lower shard's claim reached "
        "it runs the point too, until claim_lost stops it at an eval (duplicates are marked in the report)"),
    ("drive", "test_exactly_one_of_two_racing_takeovers_succeeds"): (
        "a drive takeover is an override in the taker's own shard, never refused: each taker fails the trial in its "
        "view and enqueues a resume (claims on `resume:<origin>` let one run), and the owner's late result is "
        "accepted and wins over the takeover's FAIL"),
}


def _deviation(store: str, test: str) -> str | None:
    return DEVIATIONS.get((store, test)) or DEVIATIONS.get((store.split("-")[0], test))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses `store` runs on each store, with its deviation (if any) as a strict xfail."""
    if "store" not in metafunc.fixturenames:
        return
    test = metafunc.function.__name__
    params = []
    for store in STORES:
        reason = _deviation(store, test)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(store, id=store, marks=marks))
    metafunc.parametrize("store", params, indirect=True)


# ---------------------------------------------------------------------------------------------
# The stores

# The two sheets differ where the journal's code paths do. settle_s, how long an append may take to land among rows
# already read: 0 on the serialized fake (an append lands whole, at the end), 0.01 s on the racy one (as in
# test_gsheets; here its appends land within microseconds of picking their row, racing ones in the order they came). sync_s, how long reads come from the cache: an hour on
# the serialized sheet (nothing passes by a sync: each worker learns what it must from its own appends, read back,
# and an open reads the whole journal), 0.3 s on the racy one (reads go back to the sheet, and check what they
# replayed, as often as test_gsheets has them do; no test here depends on when).
GSHEETS_ENV = {"SWEEPER_GSHEETS_TIMEOUT_S": "5", "SWEEPER_GSHEETS_BACKOFF_S": "0.01",
               "SWEEPER_GSHEETS_BACKOFF_CAP_S": "0.05"}
GSHEETS_MODES = {"serialized": {"SWEEPER_GSHEETS_SETTLE_S": "0", "SWEEPER_GSHEETS_SYNC_S": "3600"},
                 "racy": {"SWEEPER_GSHEETS_SETTLE_S": "0.01", "SWEEPER_GSHEETS_SYNC_S": "0.3"}}
DRIVE_ENV = {"SWEEPER_DRIVE_SYNC_S": "0", "SWEEPER_DRIVE_SETTLE_S": "0"}


@dataclass
class Case:
    """One store under test: its kind, a fresh empty store's URL, and the fake Sheets server behind a sheet."""

    store: str
    url: str
    fake: FakeSheets | None = None

    @contextlib.contextmanager
    def race(self, n: int) -> Iterator[None]:
        """On the racy sheet: the next n appends aim at one row (the fake's race), and did; elsewhere nothing."""
        if self.store != "gsheets-racy":
            yield
            return
        before = self.fake.stats["racy_reorders"]
        with self.fake.race(n):
            yield
        assert self.fake.stats["racy_reorders"] > before, "the racing appends never aimed at one row"


@pytest.fixture(scope="module")
def sheets_servers() -> Iterator[dict[str, tuple[FakeSheets, dict]]]:
    """A fake Sheets server per append mode, each with a service account, started on first use."""
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[FakeSheets, dict]] = {}

        def server(mode: str) -> tuple[FakeSheets, dict]:
            if mode not in servers:
                fake = stack.enter_context(FakeSheets(mode=mode))
                servers[mode] = (fake, fake.add_service_account())
            return servers[mode]

        yield server  # type: ignore[misc]


@pytest.fixture(scope="session")
def pg_database(postgres_url: str) -> str:
    """One database on the session's server for every test here, holding Optuna's schema (each test empties it:
    a TRUNCATE takes 15 ms, a new database 120 ms and its schema more)."""
    import psycopg2

    name = f"contract_{uuid.uuid4().hex[:8]}"
    with contextlib.closing(psycopg2.connect(postgres_url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    url = f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    open_storage(url).engine.dispose()
    return url


def _postgres_emptied(url: str) -> str:
    """The database with no study or trial left in it, its ids counting from 1 again; the schema's version kept."""
    import psycopg2

    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                        "AND tablename NOT IN ('version_info', 'alembic_version')")
            tables = ", ".join(row[0] for row in cur.fetchall())
            cur.execute("SET lock_timeout = '20s'")  # a session left in a transaction fails here, never hangs
            cur.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    return url


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    """A fresh store of the kind, made as `sweeper init` makes one; every test then opens it as a worker does."""
    case = _new_store(request.param, request, tmp_path, monkeypatch)
    if case.store in ("journal", "drive") or case.store.startswith("gsheets"):  # sqlite is a copy of a made store,
        open_storage(case.url, create=True)  # postgresql emptied
    return case


def _files_dir(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where file stores (and a drive worker's local shard) go: in RAM (/dev/shm) where there is one, else tmp_path.
    Nothing checked here depends on fsync, and on a VM's disk each one takes about 10 ms: half this file's time."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return tmp_path
    folder = tempfile.TemporaryDirectory(prefix="sweeper-contract-", dir=shm)
    request.addfinalizer(folder.cleanup)
    monkeypatch.setattr(tempfile, "tempdir", folder.name)  # DriveStorage keeps its own shard in a temp folder
    return Path(folder.name)


def _new_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    if kind in ("sqlite", "journal", "drive"):
        tmp_path = _files_dir(request, tmp_path, monkeypatch)
    if kind == "sqlite":
        path = tmp_path / "sweep.db"
        shutil.copyfile(request.getfixturevalue("empty_sqlite_db"), path)
        return Case(kind, f"sqlite:///{path}")
    if kind == "journal":
        return Case(kind, f"journal://{tmp_path / 'sweep.log'}")
    if kind == "postgresql":
        return Case(kind, _postgres_emptied(request.getfixturevalue("pg_database")))
    if kind.startswith("gsheets"):
        fake, account = request.getfixturevalue("sheets_servers")(kind.split("-")[1])
        for name in ("GOOGLE_APPLICATION_CREDENTIALS", "COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE"):
            monkeypatch.delenv(name, raising=False)
        env = {**GSHEETS_ENV, **GSHEETS_MODES[kind.split("-")[1]], "SWEEPER_GSHEETS_ENDPOINT": fake.url, "SWEEPER_GSHEETS_CREDENTIALS": json.dumps(account)}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return Case(kind, f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}", fake)
    assert kind == "drive", kind
    for name, value in DRIVE_ENV.items():
        monkeypatch.setenv(name, value)
    return Case(kind, f"drive://{tmp_path / 'sweep'}")


# ---------------------------------------------------------------------------------------------
# Optuna's own storage suite


class TestOptunaStorageContract(StorageTestCase):
    """Optuna's storage tests (studies, trials, params, values, attrs, pickling, concurrent attr writes)."""

    @pytest.fixture
    def storage(self, store: Case) -> BaseStorage:
        return open_storage(store.url)


# ---------------------------------------------------------------------------------------------
# What sweeper relies on


class Gate:
    """Where racing workers meet before a write: each has decided from the same view, and none has written.

    Every worker's storage is wrapped (`wrap`) so that its first write of a trial state that `when` picks waits
    here until every worker has come to it. Then all write at once (order None: a real race, which only the
    store can settle; on the racy sheet the fake also aims all their appends at one row), or one at a time in
    `order`, each after the one before it returned (a race decided by the store's logic, the same on every run).
    A worker that fails before it gets here aborts the gate, and the others go on at once."""

    def __init__(self, case: Case, n: int, when: Callable[[TrialState], bool], order: list[int] | None = None):
        self.when, self.order = when, order
        self._racing = contextlib.ExitStack()
        race = (lambda: self._racing.enter_context(case.race(n))) if order is None else None
        self._barrier, self._written = threading.Barrier(n, action=race), threading.Barrier(n)
        self._turn, self._broken, self._cond = 0, False, threading.Condition()

    def wrap(self, storage: BaseStorage, index: int) -> BaseStorage:
        write, met = storage.set_trial_state_values, []

        def set_trial_state_values(trial_id: int, state: TrialState, values: Any = None) -> bool:
            if met or not self.when(state):
                return write(trial_id, state, values)
            met.append(True)
            with contextlib.suppress(threading.BrokenBarrierError):
                self._barrier.wait(timeout=60)  # a hang guard only: every worker comes here, or aborts
            if self.order is None:
                return write(trial_id, state, values)
            with self._cond:
                self._cond.wait_for(lambda: self._broken or self.order[self._turn] == index, timeout=60)
            try:
                return write(trial_id, state, values)
            finally:
                with self._cond:
                    self._turn += 1
                    self._cond.notify_all()

        storage.set_trial_state_values = set_trial_state_values  # type: ignore[method-assign]
        return storage

    def all_written(self) -> None:
        """Wait until every worker's gated write returned (what a worker does next must not decide the race)."""
        with contextlib.suppress(threading.BrokenBarrierError):
            self._written.wait(timeout=60)

    def run(self, calls: list[Callable[[], Any]], refusals: tuple[type, ...] = ()) -> list[Any]:
        """The calls at once, one thread each; their results in order (an error of a `refusals` type stands
        for its result), or the first other error raised."""
        results: list[Any] = [None] * len(calls)
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = calls[i]()
            except BaseException as e:  # noqa: BLE001  (raised below)
                self._barrier.abort()
                self._written.abort()
                with self._cond:
                    self._broken = True
                    self._cond.notify_all()
                (results.__setitem__(i, e) if isinstance(e, refusals) else errors.append(e))

        with self._racing:
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a worker thread hung"
        if errors:
            raise errors[0]
        return results


def _rounds(n: int) -> list[list[int] | None]:
    """How the n workers' writes go, round by round: all at once; then one by one, the last-named worker first."""
    return [None, list(reversed(range(n)))]


def _worker(case: Case, name: str) -> BaseStorage:
    """A worker's own storage. On drive, its shard is named after the worker, as the runner names it (the store's
    join): claims are decided by shard name, so the rounds above see each order of names."""
    storage = open_storage(case.url)
    if hasattr(storage, "shard_id"):
        storage.shard_id = name
    return storage


WORKERS = 3


def test_an_enqueued_point_runs_once_under_concurrent_workers(store: Case):
    """Each round: one point enqueued, WORKERS workers (each with its own storage, opened after the enqueue) see it
    waiting, and all pop it (study.ask) at the same moment. Exactly one gets it; the others, a trial of their own."""
    study = optuna.create_study(study_name="s", storage=open_storage(store.url))
    rounds = _rounds(WORKERS)
    got = []
    for point, order in enumerate(rounds):
        study.enqueue_trial({"x": point / 10}, user_attrs={"point": point})
        gate = Gate(store, WORKERS, lambda state: state == TrialState.RUNNING, order)
        workers = [optuna.load_study(study_name="s", sampler=optuna.samplers.RandomSampler(seed=i),
                                     storage=gate.wrap(_worker(store, f"r{point}-w{i}"), i)) for i in range(WORKERS)]

        def work(worker: optuna.Study, gate: Gate = gate) -> int | None:
            trial = worker.ask()
            trial.suggest_float("x", 0, 1)
            mine = trial.user_attrs.get("point")
            gate.all_written()  # a finished claim would win on drive: tell only once every pop was decided
            with contextlib.suppress(Exception):  # a store that let two pop it refuses the second tell
                worker.tell(trial, 1.0)
            return mine

        got.append(sorted(gate.run([lambda w=w: work(w) for w in workers]), key=str))
    assert got == [[point, None, None] for point in range(len(rounds))]
    trials = optuna.load_study(study_name="s", storage=open_storage(store.url)).trials
    ran = sorted(t.user_attrs["point"] for t in trials if "point" in t.user_attrs and t.state == TrialState.COMPLETE)
    assert ran == list(range(len(rounds))) and len(trials) == len(rounds) * WORKERS


def test_exactly_one_of_two_racing_takeovers_succeeds(store: Case):
    """Each round: two workers judged the same running trial stale and hand it over (sweeper.leases.hand_over) at
    the same moment. The store lets exactly one of them finish it, and the owner's late result is refused."""
    owner = optuna.create_study(study_name="s", storage=open_storage(store.url))
    running = [owner.ask() for _ in _rounds(2)]  # all before any resume is enqueued, which an ask would pop
    for trial in running:
        trial.suggest_float("x", 0, 1)
    outcomes = []
    for n, order in enumerate(_rounds(2)):
        trial = running[n]
        gate = Gate(store, 2, lambda state: state.is_finished(), order)
        takers = [optuna.load_study(study_name="s", storage=gate.wrap(_worker(store, f"r{n}-t{i}"), i))
                  for i in range(2)]
        stale = [next(t for t in taker.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if t.params == trial.params) for taker in takers]
        # On a sheet, the taker whose first write (the reason, an attr of the stale trial) lands second may learn
        # it lost by StoreChanged, a SweeperError ("reload the study"; the worker does), rather than by False.
        results = gate.run([lambda t=t, s=s, n=n: hand_over(t, s, {"stale_reason": f"stale: {n}"}, f"/ckpt/{n}")
                            for t, s in zip(takers, stale)], refusals=(SweeperError,))
        late = "refused"
        try:
            trial.storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])
            late = "accepted"
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        outcomes.append(([r is True for r in results].count(True), late))
    assert outcomes == [(1, "refused")] * len(_rounds(2))
    trials = optuna.load_study(study_name="s", storage=open_storage(store.url)).trials
    taken = [t for t in trials if t.user_attrs.get("stale_reason")]
    rounds = range(len(_rounds(2)))
    assert [(t.state, t.user_attrs["stale_reason"]) for t in taken] == [(TrialState.FAIL, f"stale: {n}") for n in rounds]
    resumes = {t.user_attrs.get("resume_from") for t in trials if t.state == TrialState.WAITING}
    assert resumes >= {f"/ckpt/{n}" for n in rounds}


def test_read_your_writes(store: Case, monkeypatch: pytest.MonkeyPatch):
    """Every write through a storage object is visible to the next read through it, with no sync in between."""
    monkeypatch.setenv("SWEEPER_GSHEETS_SYNC_S", "3600")  # a sheet serves every read from its cache: no sync helps
    monkeypatch.setenv("SWEEPER_DRIVE_SYNC_S", "3600")
    storage = open_storage(store.url)
    study_id = storage.create_new_study([StudyDirection.MINIMIZE], "s")
    assert storage.get_study_id_from_name("s") == study_id
    storage.set_study_user_attr(study_id, "spec", {"a": 1})
    assert storage.get_study_user_attrs(study_id) == {"spec": {"a": 1}}
    storage.set_study_system_attr(study_id, "k", "v")
    assert storage.get_study_system_attrs(study_id)["k"] == "v"
    study = optuna.load_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.5})
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.WAITING]
    trial = study.ask()
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING]
    assert trial.suggest_float("x", 0, 1) == 0.5 and storage.get_trial(trial._trial_id).params == {"x": 0.5}
    trial.report(0.7, step=1)
    assert storage.get_trial(trial._trial_id).intermediate_values == {1: 0.7}
    trial.set_user_attr("u", [1, 2])
    storage.set_trial_system_attr(trial._trial_id, "sweeper:lease", {"beat": 1})
    frozen = storage.get_trial(trial._trial_id)
    assert frozen.user_attrs == {"u": [1, 2]} and frozen.system_attrs["sweeper:lease"] == {"beat": 1}
    study.tell(trial, 0.25)
    assert storage.get_trial(trial._trial_id).state == TrialState.COMPLETE
    assert study.best_value == 0.25 and storage.get_n_trials(study_id, (TrialState.COMPLETE,)) == 1


def test_the_storage_pickles_and_the_copy_is_one_more_client_of_the_store(store: Case):
    """A pickled copy (what a process is handed) reads the store and writes to it, like a storage of its own: what
    it writes reaches every other client, what they write reaches it, and it outlives the original."""
    storage = open_storage(store.url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.set_user_attr("k", "v")
    study.optimize(lambda t: 1.0, n_trials=1)
    copy = optuna.load_study(study_name="s", storage=pickle.loads(pickle.dumps(storage)))
    assert copy.user_attrs == {"k": "v"} and [t.value for t in copy.trials] == [1.0]
    copy.optimize(lambda t: 2.0, n_trials=1)
    study.optimize(lambda t: 3.0, n_trials=1)  # (a sheet's reader learns the copy's trial with its own write)
    assert sorted(t.value for t in study.trials) == [1.0, 2.0, 3.0]
    copy.optimize(lambda t: 4.0, n_trials=1)
    assert sorted(t.value for t in copy.trials) == [1.0, 2.0, 3.0, 4.0]
    del study, storage  # the original goes; the copy carries on
    gc.collect()
    copy.optimize(lambda t: 5.0, n_trials=1)
    fresh = optuna.load_study(study_name="s", storage=open_storage(store.url))
    assert sorted(t.value for t in fresh.trials) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_every_deviation_names_a_store_and_a_test():
    names = {n for n in dir(TestOptunaStorageContract) if n.startswith("test_")} | {
        n for n in globals() if n.startswith("test_")}
    assert [key for key in DEVIATIONS if key[0] not in KINDS | set(STORES) or key[1] not in names] == []
