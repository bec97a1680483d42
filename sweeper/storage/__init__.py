"""open_storage(url): a store URL to an Optuna storage, through a registry of schemes.

Each backend module registers its schemes with `register`; the CLI and the runner only ever
call `open_storage` and `store_lock`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ContextManager

from optuna.storages import BaseStorage

from sweeper.errors import UserError


@dataclass(frozen=True)
class Backend:
    scheme: str
    example: str
    safe_for: str
    open: Callable[[str], BaseStorage]
    lock: Callable[[str], ContextManager[None]] | None = None
    """A cross-process lock for read-check-write sequences (enqueue), where the store offers one."""


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    BACKENDS[backend.scheme] = backend


def supported() -> str:
    return ", ".join(b.example for b in BACKENDS.values())


def _backend(url: str) -> Backend:
    match = re.match(r"^([a-z][a-z0-9+.-]*)://", url or "")
    if not match:
        raise UserError(f"malformed store URL {redact(url)!r}; supported: {supported()}")
    scheme = match.group(1).split("+")[0]  # postgresql+psycopg2:// is postgresql
    if scheme not in BACKENDS:
        raise UserError(f"unknown store scheme {scheme!r} in {redact(url)!r}; supported: {supported()}")
    return BACKENDS[scheme]


def open_storage(url: str) -> BaseStorage:
    """The Optuna storage behind a store URL; UserError for a bad URL, SweeperError if unreachable."""
    return _backend(url).open(url)


def store_lock(url: str) -> ContextManager[None]:
    """A lock shared by every process using this store, or a no-op where the store has none."""
    backend = _backend(url)
    return backend.lock(url) if backend.lock else contextlib.nullcontext()


def lease_timing(storage: BaseStorage, heartbeat_s: float) -> tuple[float, float]:
    """(seconds between a running trial's heartbeats, how late other workers may see one) on this store: a sheet
    beats no more often than its quota allows; a Drive folder shows a write minutes late."""
    backend = gsheets.backend_of(storage)
    if backend is not None:
        return max(heartbeat_s, backend.settings.heartbeat_s), backend.settings.sync_s + backend.settings.settle_s
    if isinstance(storage, drive.DriveStorage):
        return heartbeat_s, storage.lag_s
    return heartbeat_s, 0.0


def redact(url: str) -> str:
    """The URL with any password replaced, safe to print."""
    url = url or ""
    # user may be empty (redis://:pw@host); a malformed URL may lack its scheme (user:pw@host)
    url = re.sub(r"(://[^:/@]*:)[^@]*@" if "://" in url else r"^([^:/@]*:)[^@]*@", r"\1***@", url)
    # libpq and friends also take secrets as query parameters (?password=..., &sslpassword=...)
    return re.sub(r"([?&][a-z_]*(?:password|passwd|secret|token|key)=)[^&#]*", r"\1***", url, flags=re.I)


# Registration happens on import; keep these last.
from sweeper.storage import local, gsheets, drive, server  # noqa: E402,F401,I001  (the order `sweeper stores` lists)
