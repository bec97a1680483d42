"""Single-machine stores: sqlite:///path.db (Optuna RDB) and journal:///path.log (Optuna journal file).

Both are safe for many processes on one machine and never across machines (DESIGN.md):
SQLite and file locks are not honoured on synced or network folders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from sweeper.errors import SweeperError, UserError, first_line
from sweeper.storage import Backend, register


def sqlite_path(url: str) -> Path:
    """SQLAlchemy's rule: sqlite:///rel.db is relative, sqlite:////abs.db absolute."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
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


def open_sqlite(url: str) -> RDBStorage:
    path = sqlite_path(url)
    _parent_must_exist(path)
    try:
        # A generous busy timeout: workers on one machine write at the same moments.
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    except Exception as e:  # sqlalchemy wraps every failure differently
        raise SweeperError(f"cannot open sqlite store {path}: {first_line(e)}") from None


def open_journal(url: str) -> JournalStorage:
    path = journal_path(url)
    _parent_must_exist(path)
    try:
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except OSError as e:
        raise SweeperError(f"cannot open journal store {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    import fcntl  # POSIX only; a laptop on Windows still reads reports

    with open(f"{path}.sweeper-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


register(Backend("sqlite", "sqlite:///path.db", "one machine", open_sqlite, lambda url: _flock(sqlite_path(url))))
register(Backend("journal", "journal:///path.log", "processes on one machine", open_journal,
                 lambda url: _flock(journal_path(url))))
