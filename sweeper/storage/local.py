"""Single-machine stores: sqlite:///path.db (Optuna RDB) and journal:///path.log (Optuna journal file).

Both are safe for many processes on one machine and never across machines (docs/design.md):
SQLite and file locks are not honoured on synced or network folders.

Only `sweeper init` (and the demo) creates a store file: every other command opens an existing one
(`open_existing`), so a typo in a path is one line, never a new empty store. A file that is not what its scheme says
is refused before anything is written to it. On SQLite, Optuna's change of a trial's state is not atomic (its
`SELECT ... FOR UPDATE` locks nothing there): `SQLiteStorage` makes it under the store's file lock, so an enqueued
point is claimed once and a trial is finished once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.storages.journal._file import get_lock_file
from optuna.trial import TrialState

from sweeper.errors import SweeperError, UserError, first_line
from sweeper.storage.registry import Backend, register

logger = logging.getLogger(__name__)


def sqlite_path(url: str) -> Path:
    """SQLAlchemy's rule: sqlite:///rel.db is relative, sqlite:////abs.db absolute."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    path = path.split("?", 1)[0]  # sqlite:///x.db?timeout=5: a query, as SQLAlchemy reads it
    if not path or path == ":memory:":
        raise UserError(f"sqlite store needs a file: sqlite:///path.db (got {url!r})")
    return Path(path)


def journal_path(url: str) -> Path:
    """journal:///abs/x.log is absolute (like file://), journal://x.log relative."""
    path = url[len("journal://"):]
    if not path or path.endswith("/"):
        raise UserError(f"journal store needs a file: journal:///path/to/sweep.log (got {url!r})")
    return Path(path)


def _parent_must_exist(path: Path) -> None:
    if not path.parent.resolve().is_dir():
        raise UserError(f"folder {path.parent} does not exist (store file {path})")


SQLITE_HEADER = b"SQLite format 3\x00"


def _no_store(path: Path) -> UserError:
    return UserError(f"no store at {path} (run sweeper init first)")


def _header(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        raise _no_store(path) from None
    except OSError as e:
        raise SweeperError(f"cannot read store file {path}: {e.strerror or e}") from None


class SQLiteStorage(RDBStorage):
    """Optuna's RDB storage on a SQLite file, whose changes of a trial's state are atomic.

    Optuna changes a state by reading the trial's state and then writing the new one; on SQLite the read takes no
    lock (`FOR UPDATE` is a no-op there, and pysqlite reads outside a transaction). So two workers on one machine
    could both read WAITING and both run an enqueued point, or two takers of a stale trial both read RUNNING and
    both finish it. Here the read and the write happen under the store's file lock: the second finds RUNNING and
    moves on (Optuna's pop takes the next point), or finds the trial finished and is refused
    (UpdateFinishedTrialError), as on a server database. Only state changes take the lock: a few per trial.
    """

    def __init__(self, url: str, path: Path, **kwargs: Any):
        super().__init__(url, **kwargs)
        self._state_lock_path = path

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        with _flock(self._state_lock_path):
            return super().set_trial_state_values(trial_id, state, values)


def _open_sqlite(url: str, create: bool) -> RDBStorage:
    path = sqlite_path(url)
    _parent_must_exist(path)
    if path.is_dir():
        raise UserError(f"sqlite store {path} is a folder, not a file")
    header = _header(path) if not create or path.exists() else b""
    if header and header != SQLITE_HEADER:
        raise UserError(f"sqlite store {path} is not a SQLite database; nothing was written to it")
    if not create and not header:
        raise _no_store(path)  # an empty file: SQLite would write Optuna's tables into it
    if header:
        _must_hold_optuna_tables(path, or_none=create)
    try:
        # A generous busy timeout: workers on one machine write at the same moments.
        return SQLiteStorage(url, path, engine_kwargs={"connect_args": {"timeout": 60}})
    except Exception as e:  # sqlalchemy wraps every failure differently
        raise SweeperError(f"cannot open sqlite store {path}: {_cause_line(e)}") from None


def _must_hold_optuna_tables(path: Path, or_none: bool) -> None:
    """An existing SQLite file of another program: Optuna would add its tables to it; refuse before it does.
    or_none: a database without any table yet will do (init makes Optuna's)."""
    try:
        # mode=rw, not ro: a hot journal a killed writer left behind is rolled back first, as Optuna's own open would
        uri = f"file:{urllib.parse.quote(str(path))}?mode=rw"  # a ? or # in a file name is no query
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=60)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        raise SweeperError(f"cannot read sqlite store {path}: {e}") from None
    if (tables or not or_none) and not {"studies", "version_info"} <= tables:
        raise UserError(f"sqlite store {path} holds no Optuna study tables (a SQLite file of another program?); "
                        "nothing was written to it")


def open_sqlite(url: str) -> RDBStorage:
    """The sqlite store at url, created if missing (sweeper init)."""
    return _open_sqlite(url, create=True)


def open_existing_sqlite(url: str) -> RDBStorage:
    """The sqlite store at url, which must exist: every command but init."""
    return _open_sqlite(url, create=False)


def _cause_line(e: BaseException) -> str:
    """The first line of what really failed: Optuna wraps a database error in a message of its own."""
    while e.__cause__ is not None and "exceeding max length" in str(e):
        e = e.__cause__
    return first_line(e)


class JournalFile(JournalFileBackend):
    """Optuna's journal file, where a half-written last line never makes the store unreadable.

    An append cut short (a full disk, a process killed mid-write, a truncated copy) leaves a last line without its
    newline. It was never acknowledged to anyone, and Optuna's readers already skip it; but Optuna's next append
    would glue its op onto it, and that line then fails every reader. Here each append first moves such a tail,
    under the store's lock, to `<file>.torn` (kept, never deleted) and says so once.
    """

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        with get_lock_file(self._lock):  # what JournalFileBackend.append_logs does, after the repair
            self._set_aside_torn_tail()
            try:
                with open(self._file_path, "ab") as f:
                    f.write(text.encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # the tail it may leave is set aside by the next append
                raise SweeperError(f"cannot write journal store {self._file_path}: {e.strerror or e}") from None

    def _set_aside_torn_tail(self) -> None:
        with open(self._file_path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return  # the usual case: one byte read per append
            keep = end
            while keep > 0:  # back to just after the last newline, a block at a time
                start = max(0, keep - 65536)
                f.seek(start)
                newline = f.read(keep - start).rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                keep = start
            f.seek(keep)
            tail = f.read()
            side = f"{self._file_path}.torn"
            with open(side, "ab") as aside:
                aside.write(tail + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        logger.warning(f"journal store {self._file_path}: its last op was only half written (a full disk or a "
                       f"process killed mid-write; never acknowledged): {len(tail)} bytes set aside in {side}")


def _open_journal(url: str, create: bool) -> JournalStorage:
    path = journal_path(url)
    _parent_must_exist(path)
    if path.is_dir():
        raise UserError(f"journal store {path} is a folder, not a file")
    if not create and not path.exists():
        raise _no_store(path)
    try:
        if path.exists() and (why := _not_a_journal(path)) is not None:
            raise UserError(f"journal store {path} is not an Optuna journal, or is damaged before its last line "
                            f"({why}); nothing was written to it")
        return JournalStorage(JournalFile(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except OSError as e:
        raise SweeperError(f"cannot open journal store {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:  # json's errors are ValueErrors: a line that is no journal op
        raise UserError(f"journal store {path} is not an Optuna journal, or is damaged before its last line "
                        f"({first_line(e)}); nothing was written to it") from None


def _not_a_journal(path: Path) -> str | None:
    """Why the file's first op shows it is no Optuna journal, or None. Optuna's reader skips a bad last line (it
    may be a torn append), so a one-line file of anything else would read as an empty journal and be written to."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith(SQLITE_HEADER):
        return f"it is a SQLite database: open it as sqlite:///{path}"
    if head and not head.startswith(b"{"):  # every op is a JSON object
        return "its first line is no journal op"
    line, newline, _ = head.partition(b"\n")
    if not newline:
        return None  # empty, a first op longer than the head, or a torn one: the reader and the next append see to it
    try:
        op = json.loads(line)
    except ValueError:
        op = None
    return None if isinstance(op, dict) and "op_code" in op else "its first line is no journal op"


def open_journal(url: str) -> JournalStorage:
    """The journal store at url, created if missing (sweeper init)."""
    return _open_journal(url, create=True)


def open_existing_journal(url: str) -> JournalStorage:
    """The journal store at url, which must exist: every command but init."""
    return _open_journal(url, create=False)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """The store's lock: an exclusive flock on PATH.sweeper-lock, for every process of this machine. Not re-entrant:
    never claim a trial (ask) while holding it."""
    import fcntl  # POSIX only; a laptop on Windows still reads reports

    lock = Path(f"{path}.sweeper-lock")
    try:
        f = open(lock, "a")
    except OSError as e:  # a read-only store (its folder or the lock file), or a folder where the lock file goes
        raise SweeperError(f"cannot lock store {path}: cannot open {lock} ({e.strerror or e}); writing to this store "
                           "needs write access to its folder") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


register(Backend("sqlite", "sqlite:///path.db", "one machine", open_sqlite, lambda url: _flock(sqlite_path(url)),
                 open_existing=open_existing_sqlite))
register(Backend("journal", "journal:///path.log", "processes on one machine", open_journal,
                 lambda url: _flock(journal_path(url)), open_existing=open_existing_journal))
