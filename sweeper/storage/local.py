"""Single-machine stores: sqlite:///path.db (Optuna RDB) and journal:///path.log (Optuna journal file).

Both are safe for many processes on one machine and never across machines (DESIGN.md):
SQLite and file locks are not honoured on synced or network folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.storages.journal._file import get_lock_file

from sweeper.errors import SweeperError, UserError, first_line
from sweeper.storage import Backend, register

logger = logging.getLogger(__name__)


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


def open_journal(url: str) -> JournalStorage:
    path = journal_path(url)
    _parent_must_exist(path)
    try:
        return JournalStorage(JournalFile(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except OSError as e:
        raise SweeperError(f"cannot open journal store {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:  # json's errors are ValueErrors: a line that is no journal op
        raise UserError(f"journal store {path} is not an Optuna journal, or is damaged before its last line "
                        f"({first_line(e)}); nothing was written to it") from None


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
