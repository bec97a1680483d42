"""The bad-input table: every malformed sweep file, flag, URL, environment number and broken store a user can hand
the `sweeper` command, and the faults a store can meet, each refused the same way.

Each case runs one command on a copy of a small world (a sweep file, its data, a sqlite and a journal store holding
the study 'demo' with its grid enqueued, a text file, another program's SQLite file) and asserts: its exit code (2
bad input, 1 runtime failure), exactly one `Error: ...` line on stderr naming the problem, nothing on stdout, no
traceback, and that nothing changed: every file of the world has the bytes and mtime it had, no file appeared,
and the case's store reads back the trials it held.

A case marked PENDING needs a change in a file another engineer is editing (the line is in its reason): it is a
strict xfail, so the day the change lands it fails until its mark goes.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import tomli_w
from click.testing import CliRunner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from conftest import SPEC_TOML
from test_spec import DELETE, MALFORMED, changed

from sweeper.cli import cli
from sweeper.errors import UserError, env_number
from sweeper.storage import open_store
from sweeper.study import create_study, enqueue, grid_points, suggest

ENV_CLEARED = ("SWEEPER_STORE", "SWEEPER_STUDY", "SWEEPER_GSHEETS_CREDENTIALS", "GOOGLE_APPLICATION_CREDENTIALS",
               "SWEEPER_GSHEETS_ENDPOINT", "COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE", "SWEEPER_DEADLINE_HOURS",
               "SWEEPER_CONNECT_TIMEOUT_S", "SWEEPER_DRIVE_SYNC_S", "SWEEPER_GSHEETS_SYNC_S")


# ---------------------------------------------------------------------------------------------
# The world every case starts from


def base_table(world: Path) -> dict[str, Any]:
    table = tomllib.loads(SPEC_TOML)
    table["data"]["source"] = str(world / "data.jsonl")
    return table


@pytest.fixture(scope="session")
def template(tmp_path_factory, empty_sqlite_db) -> Path:
    """The world, built once: copied for each case."""
    world = tmp_path_factory.mktemp("world")
    (world / "data.jsonl").write_text('{"text": "a few words to train on"}\n')
    (world / "sweep.toml").write_text(tomli_w.dumps(base_table(world)))
    (world / "t.txt").write_text("hello, I am not a store\n")
    import sqlite3

    with sqlite3.connect(world / "other.db") as db:
        db.execute("CREATE TABLE recipes (name TEXT)")
    shutil.copyfile(empty_sqlite_db, world / "s.db")
    for url in (f"sqlite:///{world / 's.db'}", f"journal://{world / 'j.log'}"):
        store = open_store(url, create=True)
        spec = spec_from_world(world)
        study, _ = create_study(spec, store)
        enqueue(study, store, grid_points(spec))
        if url.startswith("sqlite"):  # one complete trial: `best` has something to show
            trial = study.ask()
            suggest(trial, spec)
            study.tell(trial, 1.5)
    return world


def spec_from_world(world: Path):
    from sweeper.spec import spec_from_dict

    return spec_from_dict(base_table(world))


@dataclass
class World:
    path: Path

    def url(self, kind: str) -> str:
        return {"s": f"sqlite:///{self.path / 's.db'}", "j": f"journal://{self.path / 'j.log'}"}[kind]

    def spec(self, name: str, table: dict[str, Any] | None = None, text: str | None = None) -> None:
        """Write a sweep file into the world (before the snapshot)."""
        (self.path / name).write_text(text if text is not None else tomli_w.dumps(table))

    def table(self) -> dict[str, Any]:
        # The path the template's stores hold: the world is a copy, the study's spec names the template's data.
        return tomllib.loads((self.path / "sweep.toml").read_text())


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                          p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def trials_of(url: str) -> list[tuple[int, str, dict]]:
    study = optuna.load_study(study_name="demo", storage=open_store(url).storage)
    return [(t.number, t.state.name, t.system_attrs.get("fixed_params", t.params))
            for t in study.get_trials(deepcopy=False)]


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    id: str
    argv: list[str]
    """The command; {w} is the world's folder, {s} and {j} its sqlite and journal store URLs."""
    code: int
    says: str
    """What the one Error line holds."""
    store: str | None = "s"
    """The store to read back afterwards (s, j), or None."""
    setup: Callable[[World], None] | None = None
    env: dict[str, str | None] = field(default_factory=dict)
    pending: str | None = None
    absent: tuple[str, ...] = ()
    """Text that must not appear in the output (a password)."""
    patch: Callable[[pytest.MonkeyPatch, World], Callable[[], None] | None] | None = None
    """Before the setup: changes the process (a read-only folder, a full disk); returns what undoes it, or None."""


def spec_case(id: str, change: Callable[[dict], dict], says: str, store: str = "{w}/new.db", **kw) -> Case:
    """init with a sweep file changed from the valid one; by default into a store path that must stay absent."""
    def setup(world: World) -> None:
        world.spec("bad.toml", change(world.table()))
    url = f"sqlite:///{store}" if store.startswith("{w}") else store
    return Case(id, ["init", "{w}/bad.toml", "--store", url], 2, says, setup=setup, **kw)


def text_case(id: str, text: str, says: str) -> Case:
    return Case(id, ["init", "{w}/bad.toml", "--store", "{s}"], 2, says,
                setup=lambda world: world.spec("bad.toml", text=text))


def space(**params: dict) -> Callable[[dict], dict]:
    def change(table: dict) -> dict:
        table["space"] = {**table["space"], **params}
        return table
    return change


def with_(path: str, value: Any) -> Callable[[dict], dict]:
    return lambda table: changed(table, path, value)


def narrowed(table: dict) -> dict:
    table["space"]["batch_size"] = {"choices": [8]}
    return table


def two_studies(world: World) -> None:
    other = world.table()
    other["study"] = "other"
    from sweeper.spec import spec_from_dict

    create_study(spec_from_dict(other), open_store(world.url("s")))


def folder_at_lock(world: World) -> None:
    (world.path / "s.db.sweeper-lock").unlink()
    (world.path / "s.db.sweeper-lock").mkdir()


def read_only_lock(monkeypatch: pytest.MonkeyPatch, world: World) -> None:
    """The store's folder is read-only (as root, chmod would not stop us): opening its lock file is refused."""
    from sweeper.storage import local

    real = open

    def refusing(file, mode="r", *args, **kwargs):
        if str(file).endswith(".sweeper-lock") and mode != "r":
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, mode, *args, **kwargs)
    monkeypatch.setattr(local, "open", refusing, raising=False)


FULL_POINT: dict[str, float] = {}


def fill_the_disk(world: World) -> None:
    """Enqueue points until SQLite says the database or disk is full (max_page_count caps the file where it is):
    the next enqueue of the point that failed makes the very same write."""
    study = optuna.load_study(study_name="demo", storage=open_store(world.url("s")).storage)
    for i in range(5000):
        point = {"learning_rate": 2e-4 + i * 1e-7, "batch_size": 8}
        try:
            study.enqueue_trial(point)
        except optuna.exceptions.StorageInternalError:
            FULL_POINT.update(point)
            return
    raise AssertionError("the capped SQLite file never filled up")


def capped_sqlite(monkeypatch: pytest.MonkeyPatch, world: World) -> Callable[[], None]:
    """The SQLite file may not grow (PRAGMA max_page_count on every connection): the disk is full."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def cap(dbapi_connection, _record) -> None:
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")
        dbapi_connection.execute("PRAGMA synchronous = OFF")  # filling it up need not wait for the disk
    event.listen(Engine, "connect", cap)
    # Optuna retries a failed trial insert 5 times, up to 2 s apart at random: here, at once.
    monkeypatch.setattr(optuna.storages._rdb.storage, "random", types.SimpleNamespace(random=lambda: 0.0))
    return lambda: event.remove(Engine, "connect", cap)


PW = "postgresql://u:PLANTED@PW123@127.0.0.1:1/db"
DATA_MISSING = "is a path, and there is no file there"

CASES: list[Case] = [
    # -- init: the sweep file (every malformed spec of test_spec.py, through the command) -------------
    *[spec_case(f"spec: {name}", with_(path, value), expected) for name, path, value, expected in MALFORMED],
    text_case("toml: unclosed table header", 'study = "demo"\n[model\nid = "x"\n', "is not valid TOML"),
    text_case("toml: duplicate key", 'study = "demo"\nstudy = "again"\n', "is not valid TOML"),
    text_case("toml: missing value", "n_trials = \n", "is not valid TOML"),
    Case("init: sweep file missing", ["init", "{w}/nope.toml", "--store", "{s}"], 2, "sweep file not found"),
    spec_case("spec: grid outside the choices", space(batch_size={"choices": [8, 16], "grid": [8, 32]}),
              "space.batch_size: grid value 32 is not among the choices [8, 16]"),
    spec_case("spec: duplicate choices", space(batch_size={"choices": [8, 16, 8]}),
              "space.batch_size: choices repeat 8"),
    spec_case("spec: duplicate grid values", space(learning_rate={"low": 1e-4, "high": 1e-3, "grid": [2e-4, 2e-4]}),
              "space.learning_rate: grid repeat 0.0002"),
    spec_case("spec: more evals than steps", with_("budget.evals", 50),
              "budget.evals: 50 evaluations, but a trial of batch_size 16 has at most 9 optimizer steps"),
    spec_case("spec: more evals than steps of the largest range batch", lambda t: changed(changed(
        t, "space.batch_size", {"low": 8, "high": 64}), "budget.train_tokens", 16_000),
              "budget.evals: 4 evaluations, but a trial of batch_size 64 has at most 3"),
    spec_case("spec: more evals than steps of an examples budget", lambda t: changed(changed(
        t, "budget.train_tokens", DELETE), "budget.train_examples", 40), "has at most 2 optimizer steps"),
    spec_case("spec: fixed in [train] and tuned in [space]", with_("train.batch_size", 8),
              "train.batch_size: fixed in [train] and tuned in [space.batch_size]"),
    spec_case("spec: unknown table lists the tables", with_("trian", {"lora_r": 4}),
              "[trian]: unknown table (allowed: study, n_trials"),
    spec_case("spec: unknown table suggests the near one", with_("trian", {"lora_r": 4}),
              "tables: [model], [data], [budget], [train], [space]; did you mean [train]?"),
    spec_case("spec: data file missing, local store", with_("data.source", "./no-such.jsonl"), DATA_MISSING),
    spec_case("spec: data file missing, relative path", with_("data.source", "no-such/data.jsonl"), DATA_MISSING,
              store="{j}"),
    spec_case("spec: data file missing, journal store", with_("data.source", "/no/such/data.jsonl"), DATA_MISSING,
              store="{j}"),
    spec_case("spec: model folder missing, local store", with_("model.id", "./no-such-model"),
              "model.id './no-such-model' is a path, and there is no model folder there"),
    spec_case("spec: model folder without a config", with_("model.id", "."),
              "is a folder without a config.json: not a saved model"),
    spec_case("spec: a text_field the data does not have", with_("data.text_field", "txt"),
              "data.text_field = 'txt', but the first rows of data.jsonl have no such field (they have text)"),
    Case("init: changed spec without --overwrite", ["init", "{w}/bad.toml", "--store", "{s}"], 2,
         "already exists with a different spec (changed: n_trials)",
         setup=lambda w: w.spec("bad.toml", changed(w.table(), "n_trials", 12))),
    Case("init --overwrite narrows the space under queued points", ["init", "{w}/bad.toml", "--store", "{s}",
                                                                    "--overwrite"], 2,
         "leaves out 4 enqueued points, which every worker would fail on: #1 learning_rate=0.0001,batch_size=16 "
         "(batch_size not in [8])", setup=lambda w: w.spec("bad.toml", narrowed(w.table()))),
    Case("init --overwrite narrows a journal store", ["init", "{w}/bad.toml", "--store", "{j}", "--overwrite"], 2,
         "#1 learning_rate=0.0001,batch_size=16 (batch_size not in [8])", store="j",
         setup=lambda w: w.spec("bad.toml", narrowed(w.table()))),
    Case("init: sqlite URL at a text file", ["init", "{w}/sweep.toml", "--store", "sqlite:///{w}/t.txt"], 2,
         "sqlite store {w}/t.txt is not a SQLite database; nothing was written to it"),
    Case("init: sqlite URL at another program's database", ["init", "{w}/sweep.toml", "--store",
                                                            "sqlite:///{w}/other.db"], 2,
         "sqlite store {w}/other.db holds no Optuna study tables"),
    Case("init: journal URL at a sqlite file", ["init", "{w}/sweep.toml", "--store", "journal://{w}/s.db"], 2,
         "(it is a SQLite database: open it as sqlite:///{w}/s.db); nothing was written to it"),
    Case("init: journal URL at a text file", ["init", "{w}/sweep.toml", "--store", "journal://{w}/t.txt"], 2,
         "journal store {w}/t.txt is not an Optuna journal"),
    Case("init: sqlite in a missing folder", ["init", "{w}/sweep.toml", "--store", "sqlite:///{w}/no/s.db"], 2,
         "folder {w}/no does not exist"),
    Case("init: journal in a missing folder", ["init", "{w}/sweep.toml", "--store", "journal://{w}/no/j.log"], 2,
         "folder {w}/no does not exist"),
    Case("init: sqlite URL at a folder", ["init", "{w}/sweep.toml", "--store", "sqlite:///{w}"], 2, "is a folder"),
    # -- enqueue ------------------------------------------------------------------------------------
    *[Case(f"enqueue --point {point}", ["enqueue", "--store", "{s}", "--point", "learning_rate=2e-4,batch_size=8",
                                         "--point", point], 2, says) for point, says in [
        ("learning_rate=abc", "learning_rate='abc' is not a number"),
        ("learning_rate=0.5", "learning_rate=0.5 is outside the space ([0.0001, 0.001])"),
        ("batch_size=12", "batch_size=12 is outside the space ([8, 16])"),
        ("batch_size=8.5", "batch_size='8.5' is not a whole number"),
        ("batch_size=abc", "batch_size='abc' is not a number"),
        ("lora_r=8", "give name=value pairs for params in the space (learning_rate, batch_size)"),
        ("learning_rate", "give name=value pairs"),
        (",", "empty"),
        ("batch_size=8,batch_size=16", "batch_size is given twice"),
        ("learning_rate=2e-4,learning_rate=2e-4", "learning_rate is given twice"),
    ]],
    Case("enqueue --point outside, journal store", ["enqueue", "--store", "{j}", "--point", "batch_size=32"], 2,
         "batch_size=32 is outside the space ([8, 16])", store="j"),
    Case("enqueue without --grid or --point", ["enqueue", "--store", "{s}"], 2, "give --grid or at least one --point"),
    Case("enqueue into a study that is not there", ["enqueue", "--store", "{s}", "--study", "nope", "--grid"], 2,
         "no study 'nope' in the store; studies here: demo"),
    Case("enqueue on a read-only store", ["enqueue", "--store", "{s}", "--point", "learning_rate=3e-4,batch_size=8"],
         1, "cannot lock store {w}/s.db: cannot open {w}/s.db.sweeper-lock (Permission denied)", patch=read_only_lock),
    Case("enqueue on a read-only journal store", ["enqueue", "--store", "{j}", "--point",
                                                  "learning_rate=3e-4,batch_size=8"], 1,
         "cannot lock store {w}/j.log", store="j", patch=read_only_lock),
    Case("enqueue where the lock file is a folder", ["enqueue", "--store", "{s}", "--grid"], 1,
         "cannot open {w}/s.db.sweeper-lock (Is a directory)", setup=folder_at_lock),
    Case("enqueue on a full disk", ["enqueue", "--store", "{s}", "--point", "FULL"], 1,
         "the disk is full (SQLite: database or disk is full)", patch=capped_sqlite, setup=fill_the_disk),
    Case("enqueue on a typo'd sqlite path", ["enqueue", "--store", "sqlite:///{w}/typo.db", "--grid"], 2,
         "no store at {w}/typo.db (run sweeper init first)"),
    Case("enqueue on a typo'd journal path", ["enqueue", "--store", "journal://{w}/typo.log", "--grid"], 2,
         "no store at {w}/typo.log (run sweeper init first)"),
    # -- reading commands and the worker: never a new store --------------------------------------------
    *[Case(f"{' '.join(cmd)} on a typo'd {kind} path", [*cmd, "--store", f"{kind}{{w}}/{name}"], 2,
           f"no store at {{w}}/{name} (run sweeper init first)")
      for cmd in (["report"], ["best"], ["worker", "--study", "demo"], ["retry", "--failed"])
      for kind, name in (("sqlite:///", "typo.db"), ("journal://", "typo.log"))],
    Case("report on an empty file as sqlite", ["report", "--store", "sqlite:///{w}/empty.db"], 2,
         "no store at {w}/empty.db", setup=lambda w: (w.path / "empty.db").touch()),
    Case("report: sqlite URL at a text file", ["report", "--store", "sqlite:///{w}/t.txt"], 2,
         "is not a SQLite database; nothing was written to it"),
    Case("report: sqlite URL at another program's database", ["report", "--store", "sqlite:///{w}/other.db"], 2,
         "holds no Optuna study tables (a SQLite file of another program?); nothing was written to it"),
    Case("report: journal URL at a sqlite file", ["report", "--store", "journal://{w}/s.db"], 2,
         "is not an Optuna journal"),
    Case("report: journal URL at a folder", ["report", "--store", "journal://{w}"], 2, "is a folder, not a file"),
    Case("report: a journal whose middle is garbage", ["report", "--store", "{j}"], 2,
         "is not an Optuna journal, or is damaged before its last line", store=None,
         setup=lambda w: (w.path / "j.log").write_bytes(b"garbage\n" + (w.path / "j.log").read_bytes())),
    Case("report --json --csv", ["report", "--store", "{s}", "--json", "--csv"], 2, "give --json or --csv, not both"),
    Case("report --study nope", ["report", "--store", "{s}", "--study", "nope"], 2,
         "no study 'nope' in the store; studies here: demo"),
    Case("report without --study on a store of two", ["report", "--store", "{s}"], 2,
         "give --study: the store holds studies", setup=two_studies),
    Case("report: unknown scheme", ["report", "--store", "s3://bucket/x"], 2, "unknown store scheme 's3'", store=None),
    Case("report: no scheme", ["report", "--store", "sweep.db"], 2, "malformed store URL 'sweep.db'", store=None),
    Case("report: sqlite in memory", ["report", "--store", "sqlite:///:memory:"], 2, "sqlite store needs a file",
         store=None),
    Case("report: journal without a file", ["report", "--store", "journal:///tmp/logs/"], 2,
         "journal store needs a file", store=None),
    Case("report: grpc without a port", ["report", "--store", "grpc://host"], 2, "grpc store needs host and port",
         store=None),
    Case("report: postgres port that is no number", ["report", "--store", "postgresql://u:p@host:notaport/db"], 2,
         "malformed store URL postgresql://u:***@host:notaport/db: port 'notaport' is not a number", store=None),
    Case("report: postgres password with an unencoded @", ["report", "--store", PW], 2,
         "malformed store URL postgresql://u:***@127.0.0.1:1/db: its password holds an '@'", store=None,
         absent=("PLANTED", "PW123")),
    Case("report: postgres password with an @ and a colon", ["report", "--store", "postgresql://u:p@ss:hunter2@host:5432/db"],
         2, "malformed store URL postgresql://u:***@host:5432/db: its password holds an '@'", store=None,
         absent=("hunter2", "ss:")),
    Case("report: SWEEPER_CONNECT_TIMEOUT_S not a number", ["report", "--store", "postgresql://u:p@127.0.0.1:1/db"],
         2, "SWEEPER_CONNECT_TIMEOUT_S must be a positive number of seconds (got '5s')",
         env={"SWEEPER_CONNECT_TIMEOUT_S": "5s"}, store=None),
    Case("report: a grpc server that is not there", ["report", "--store", "grpc://127.0.0.1:1"], 1,
         "cannot open store grpc://127.0.0.1:1: no gRPC server answered within 1 s (SWEEPER_CONNECT_TIMEOUT_S)",
         env={"SWEEPER_CONNECT_TIMEOUT_S": "1"}, store=None),
    Case("report: GOOGLE_APPLICATION_CREDENTIALS names a missing file", ["report", "--store", "gsheets://abc"], 2,
         "GOOGLE_APPLICATION_CREDENTIALS names /no/such/key.json, and there is no file there",
         env={"GOOGLE_APPLICATION_CREDENTIALS": "/no/such/key.json"}, store=None),
    Case("report: SWEEPER_GSHEETS_SYNC_S not a number", ["report", "--store", "gsheets://abc"], 2,
         "SWEEPER_GSHEETS_SYNC_S must be a number of seconds (got '5s')", env={"SWEEPER_GSHEETS_SYNC_S": "5s"},
         store=None),
    Case("report: SWEEPER_DRIVE_SYNC_S not a number", ["report", "--store", "drive://{w}/sweep"], 2,
         "SWEEPER_DRIVE_SYNC_S must be a number of seconds (got '5s')", env={"SWEEPER_DRIVE_SYNC_S": "5s"},
         store=None),
    Case("report: drive URL at a regular file", ["report", "--store", "drive://{w}/t.txt"], 2,
         "is a file, not a folder", store=None),
    Case("worker: SWEEPER_DEADLINE_HOURS not a number", ["worker", "--store", "{s}"], 2,
         "SWEEPER_DEADLINE_HOURS must be a number of hours (got 'soon')", env={"SWEEPER_DEADLINE_HOURS": "soon"}),
    Case("worker on a study that is not there", ["worker", "--store", "{s}", "--study", "nope"], 2,
         "no study 'nope' in the store; studies here: demo"),
    # -- best ---------------------------------------------------------------------------------------
    Case("best --json --export to a .toml file", ["best", "--store", "{s}", "--json", "--export", "{w}/best.toml"], 2,
         "--json contradicts --export {w}/best.toml: a .toml file gets TOML"),
    Case("best --export into a missing folder", ["best", "--store", "{s}", "--export", "{w}/no/best.toml"], 2,
         "folder {w}/no does not exist (for {w}/no/best.toml)"),
    Case("best without a complete trial", ["best", "--store", "{j}"], 1, "study 'demo' has no complete trial yet",
         store="j"),
    # -- notebook, retry, launch ---------------------------------------------------------------------
    Case("notebook -o into a missing folder", ["notebook", "--platform", "local", "--store", "{s}", "--study", "demo",
                                               "-o", "{w}/no/runner.ipynb"], 2, "folder {w}/no does not exist"),
    Case("notebook for Colab on a file store", ["notebook", "--platform", "colab", "--store", "{s}", "-o",
                                                "{w}/runner.ipynb"], 2, "a Colab notebook cannot reach"),
    Case("notebook for Kaggle on a drive store", ["notebook", "--platform", "kaggle", "--store", "drive:///content/x",
                                                  "-o", "{w}/runner.ipynb"], 2, "Kaggle cannot mount Google Drive"),
    Case("notebook --install holding a token", ["notebook", "--platform", "kaggle", "--store", "gsheets://abc",
                                                "--install", "sweeper-qlora @ git+https://ghp_x@github.com/t/s",
                                                "-o", "{w}/runner.ipynb"], 2,
         "the install requirement holds a credential",
         absent=("ghp_x",)),
    Case("notebook: a password with an unencoded @ never shows", ["notebook", "--platform", "kaggle", "--store", PW,
                                                                  "-o", "{w}/no/runner.ipynb"], 2,
         "folder {w}/no does not exist", absent=("PLANTED", "PW123")),
    Case("retry without --failed or --trial", ["retry", "--store", "{s}"], 2, "give --failed or --trial N (not both)"),
    Case("retry with both", ["retry", "--store", "{s}", "--failed", "--trial", "0"], 2, "give --failed or --trial N"),
    Case("launch kaggle without --store", ["launch", "kaggle", "--study", "demo"], 2, "give --store"),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ENV_CLEARED:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=pytest.mark.xfail(strict=True, reason=c.pending))
                                  if c.pending else pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_one_error_line_and_leaves_every_store_as_it_was(case: Case, template: Path, tmp_path: Path,
                                                                      monkeypatch):
    world = World(tmp_path / "w")
    shutil.copytree(template, world.path)
    monkeypatch.chdir(world.path)  # a relative path in a case resolves inside the world
    undo = case.patch(monkeypatch, world) if case.patch else None
    try:
        if case.setup:
            case.setup(world)
        before = snapshot(world.path)
        trials = trials_of(world.url(case.store)) if case.store else None
        fill = {"{w}": str(world.path), "{s}": world.url("s"), "{j}": world.url("j")}
        argv = []
        for arg in case.argv:
            for key, value in fill.items():
                arg = arg.replace(key, value)
            argv.append(f"learning_rate={FULL_POINT['learning_rate']!r},batch_size=8" if arg == "FULL" else arg)
        result = CliRunner().invoke(cli, argv, env=case.env, catch_exceptions=False)
    finally:
        if undo is not None:
            undo()
    says = case.says.replace("{w}", str(world.path))

    assert result.exit_code == case.code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert says in lines[0]
    assert result.stdout == ""
    assert not any(secret in result.output for secret in case.absent)
    assert snapshot(world.path) == before  # no file written, none created
    if trials is not None:
        assert trials_of(world.url(case.store)) == trials  # the store reads back every trial it held


def test_a_notebook_for_a_password_with_an_unencoded_at_never_holds_any_of_it(tmp_path):
    result = CliRunner().invoke(cli, ["notebook", "--platform", "local", "--store", PW, "--study", "demo", "-o",
                                      str(tmp_path / "runner.ipynb")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "runner.ipynb").read_text()
    assert "postgresql://u:***@127.0.0.1:1/db: read from the secret SWEEPER_STORE" in text
    assert not any(secret in text + result.output for secret in ("PLANTED", "PW123"))


def test_the_table_holds_at_least_sixty_cases():
    assert len(CASES) >= 60


# ---------------------------------------------------------------------------------------------
# The one parser of numbers from the environment


@pytest.mark.parametrize(("name", "raw", "kwargs", "expected"), [
    ("SWEEPER_X_S", "5", {}, 5.0),
    ("SWEEPER_X_S", " 2.5 ", {}, 2.5),
    ("SWEEPER_X_S", "0", {}, 0.0),
    ("SWEEPER_X_S", "", {}, "default"),
    ("SWEEPER_X_ATTEMPTS", "3.0", {"integer": True}, 3),
])
def test_an_environment_number_is_read_as_a_number(monkeypatch, name, raw, kwargs, expected):
    monkeypatch.setenv(name, raw)
    assert env_number(name, "default", **kwargs) == expected


@pytest.mark.parametrize(("name", "raw", "kwargs", "message"), [
    ("SWEEPER_DRIVE_SYNC_S", "5s", {}, "SWEEPER_DRIVE_SYNC_S must be a number of seconds (got '5s')"),
    ("SWEEPER_DRIVE_SYNC_S", "-1", {}, "SWEEPER_DRIVE_SYNC_S must be a number of seconds (got '-1')"),
    ("SWEEPER_DRIVE_SYNC_S", "nan", {}, "SWEEPER_DRIVE_SYNC_S must be a number of seconds (got 'nan')"),
    ("SWEEPER_KAGGLE_TIMEOUT_S", "0", {"positive": True},
     "SWEEPER_KAGGLE_TIMEOUT_S must be a positive number of seconds (got '0')"),
    ("SWEEPER_DEADLINE_HOURS", "12h", {}, "SWEEPER_DEADLINE_HOURS must be a number of hours (got '12h')"),
    ("SWEEPER_GSHEETS_ATTEMPTS", "2.5", {"integer": True, "positive": True},
     "SWEEPER_GSHEETS_ATTEMPTS must be a positive whole number (got '2.5')"),
])
def test_a_bad_environment_number_is_one_message_naming_the_variable(monkeypatch, name, raw, kwargs, message):
    monkeypatch.setenv(name, raw)
    with pytest.raises(UserError) as caught:
        env_number(name, 1.0, **kwargs)
    assert str(caught.value) == message


def test_every_sweeper_number_from_the_environment_goes_through_the_one_parser():
    """No module of ours turns an environment value into a number by itself (float(os.environ...)."""
    import re

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in [*root.glob("sweeper/**/*.py"), *root.glob("runner/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(float|int)\(\s*os\.(environ|getenv)", line):
                offenders.append(f"{path.relative_to(root)}:{n}")
    assert offenders == []
