"""Store URLs to Optuna storages, through one registry of backends: the only door to a store.

Each backend module (sweeper/storage/<scheme>) registers its scheme with `register`. The rest of sweeper opens a `Store` with
`open_store(url)` and asks it what it needs; what a particular backend does differently (how often a lease
may beat, joining as a worker, a claim lost, views to refresh, notes for the report) is an optional hook on
its `Backend` row, so nothing outside sweeper/storage/ imports a backend module.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ContextManager

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from sweeper.errors import UserError


@dataclass(frozen=True)
class Backend:
    """A registry row: a scheme, how to open its URLs, and the hooks it needs (None: the default)."""

    scheme: str
    example: str
    safe_for: str
    open: Callable[[str], BaseStorage]
    """Opens the store at a URL, creating it where it is missing and the backend creates stores (sweeper init)."""
    lock: Callable[[str], ContextManager[None]] | None = None
    """A cross-process lock for read-check-write sequences (enqueue), where the store offers one."""
    open_existing: Callable[[str], BaseStorage] | None = None
    """Opens only a store that is already there, for every command but init: a mistyped path is one line, never a
    new empty store. None: `open` never creates a store (a server)."""
    missing: Callable[[], str | None] | None = None
    """What this install lacks to open such a store ('pip install ...'), checked without importing it; None: nothing."""
    lease_timing: Callable[[BaseStorage, float], tuple[float, float]] | None = None
    """(storage, heartbeat_s) -> (seconds between a lease's beats, how late other workers may see a write)."""
    join: Callable[[BaseStorage, str], None] | None = None
    """(storage, worker id): a worker is about to write through this storage."""
    claim_lost: Callable[[BaseStorage, int], str | None] | None = None
    """(storage, trial id) -> why the running trial must stop because another record holds its place, or None."""
    update_views: Callable[[BaseStorage, Any, Mapping[str, Any]], int] | None = None
    """(storage, study, worker info) -> requests made refreshing views for people kept beside the study."""
    trial_notes: Callable[[list[FrozenTrial]], dict[int, str]] | None = None
    """trials -> {trial number: note for the report}."""


BACKENDS: dict[str, Backend] = {}
FILE_STORES = ("sqlite:", "journal:")  # URL prefixes of stores that are a file on this machine: their workers run here


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


@dataclass(frozen=True)
class Store:
    """An opened store: its URL, its Optuna storage and its backend's hooks."""

    url: str = field(repr=False)  # may hold a password
    storage: BaseStorage
    backend: Backend

    def lease_timing(self, heartbeat_s: float) -> tuple[float, float]:
        """(seconds between a running trial's heartbeats, how late other workers may see one)."""
        hook = self.backend.lease_timing
        return hook(self.storage, heartbeat_s) if hook else (heartbeat_s, 0.0)

    def join(self, worker_id: str) -> None:
        if self.backend.join:
            self.backend.join(self.storage, worker_id)

    def claim_lost(self, trial_id: int) -> str | None:
        return self.backend.claim_lost(self.storage, trial_id) if self.backend.claim_lost else None

    def update_views(self, study: Any, worker_info: Mapping[str, Any]) -> int:
        """worker_info: worker (id), account, platform, gpu, trial (number running, or None), gpu_hours."""
        return self.backend.update_views(self.storage, study, worker_info) if self.backend.update_views else 0

    def trial_notes(self, trials: list[FrozenTrial]) -> dict[int, str]:
        return self.backend.trial_notes(trials) if self.backend.trial_notes else {}


def open_store(url: str, create: bool = False) -> Store:
    """The store behind a URL; UserError for a bad URL or a store that is not there, SweeperError if unreachable.

    create: make the store where it is missing (sweeper init and the demo only); every other caller opens what is
    there, so a mistyped path never becomes a new empty store.
    """
    backend = _backend(url)
    opener = backend.open if create or backend.open_existing is None else backend.open_existing
    with gc_paused():  # a journal store replays its whole log here
        return Store(url, opener(url), backend)


def open_storage(url: str, create: bool = False) -> BaseStorage:
    """The Optuna storage behind a store URL (for code that needs no hook: tests, benchmarks)."""
    return open_store(url, create=create).storage


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection while a store's trials are built: they all stay alive, so the collector's
    passes over them are wasted (a quarter of the time to open a 5,000-trial journal)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def store_lock(url: str) -> ContextManager[None]:
    """A lock shared by every process using this store, or a no-op where the store has none."""
    backend = _backend(url)
    return backend.lock(url) if backend.lock else contextlib.nullcontext()


def redact(url: str) -> str:
    """The URL with any password replaced, safe to print."""
    url = url or ""
    # user may be empty (redis://:pw@host); a malformed URL may lack its scheme (user:pw@host). The password runs to
    # the last '@': one typed with an unencoded '@' (u:p@ss@host) is masked whole, not cut at its own '@'.
    url = re.sub(r"(://[^:/@]*:).*@" if "://" in url else r"^([^:/@]*:).*@", r"\1***@", url, count=1)
    # libpq and friends also take secrets as query parameters (?password=..., &sslpassword=...)
    return re.sub(r"([?&][a-z_]*(?:password|passwd|secret|token|key)=)[^&#]*", r"\1***", url, flags=re.I)
