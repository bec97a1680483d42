"""gsheets://SPREADSHEET_ID: Optuna's journal in a Google Sheet, for many workers under many accounts.

journal.py: the journal worksheet as an Optuna journal backend (the only truth). views.py: the `trials` and
`workers` worksheets for people. client.py: the HTTP client (timeouts, bounded retries, request counts).
auth.py: finding the credentials. This module: the URL, and the store's registry row with its hooks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from optuna.storages import JournalStorage

from sweeper.errors import UserError
from sweeper.storage.registry import Backend, register
from sweeper.storage.gsheets.journal import SheetJournalBackend


def spreadsheet_id(url: str) -> str:
    """gsheets://ID, or gsheets:// followed by the sheet's address as copied from the browser."""
    rest = url[len("gsheets://"):]
    m = re.search(r"/d/([A-Za-z0-9_-]+)", rest)
    sid = m.group(1) if m else rest.strip("/")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", sid):
        raise UserError(f"gsheets store needs a spreadsheet ID: gsheets://ID, the part of the sheet's address "
                        f"between /d/ and /edit (got {url!r})")
    return sid


def open_gsheets(url: str) -> JournalStorage:
    """The study store in a spreadsheet; prepares its worksheets on first use (sweeper init)."""
    return JournalStorage(SheetJournalBackend(spreadsheet_id(url)))


def open_existing_gsheets(url: str) -> JournalStorage:
    """The study store in a spreadsheet that `sweeper init` prepared; UserError for a sheet without a journal."""
    return JournalStorage(SheetJournalBackend(spreadsheet_id(url), create=False))


def backend_of(storage: Any) -> SheetJournalBackend | None:
    backend = getattr(storage, "_backend", None)  # JournalStorage keeps its backend here
    return backend if isinstance(backend, SheetJournalBackend) else None


def request_counts(storage: Any) -> dict[str, int]:
    """What this process's gsheets store has done so far: reads, writes (each attempt counts against the quota),
    retries, http_408, http_429, http_5xx, network, uncertain_appends, reappends, duplicates_dropped, settle_waits,
    settle_wait_ms, late_landings, views_requests, views_failed; {} for other stores. Diff two calls to count the
    requests of one trial."""
    backend = backend_of(storage)
    return dict(backend.stats) if backend else {}


def lease_timing(storage: JournalStorage, heartbeat_s: float) -> tuple[float, float]:
    """A sheet's lease beats no more often than its quota allows, and a write shows after sync_s plus the settle
    time, which grows with Google's latency up to settle_max_s."""
    settings = backend_of(storage).settings
    settle = max(settings.settle_s, settings.settle_max_s) if settings.settle_s else 0.0
    return max(heartbeat_s, settings.heartbeat_s), settings.sync_s + settle


def update_views(storage: JournalStorage, study: Any, worker_info: Mapping[str, Any]) -> int:
    """Refresh the `trials` and `workers` views (views.py); the number of requests made, 0 when nothing was due."""
    from sweeper.storage.gsheets.views import update_backend_views  # gspread: imported on first use

    return update_backend_views(backend_of(storage), study, worker_info)


register(Backend("gsheets", "gsheets://SPREADSHEET_ID", "many workers, many accounts, Colab and Kaggle",
                 open_gsheets, open_existing=open_existing_gsheets, lease_timing=lease_timing, update_views=update_views))
