"""The `trials` and `workers` worksheets: live views of a gsheets study for people, never read back.

The journal is the only truth; deleting a view loses nothing (the next update recreates it). To spare the
per-minute quota, each worker makes at most one request per update (two the first time): the `trials` table only when its own
trial changed (started or ended), its `workers` row when its trial changed; each at most once per views_s,
and the row at least once per heartbeat_s (GPU hours and the heartbeat time ride along with those writes).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import optuna
from gspread.exceptions import APIError

from sweeper.errors import SweeperError
from sweeper.storage.sheets_api import MayHaveLanded, SheetsClient, SheetsUnavailable

TRIALS, WORKERS = "trials", "workers"
WORKER_HEADER = ["worker", "account", "platform", "GPU", "current trial", "last heartbeat (UTC)", "GPU hours"]
WORKER_KEYS = ["worker", "account", "platform", "gpu", "trial", None, "gpu_hours"]  # None: the heartbeat
TRIAL_COLUMNS_AFTER_PARAMS = ["value", "account", "GPU", "wall s"]


def update_backend_views(backend, study: optuna.Study, worker_info: Mapping[str, Any]) -> int:
    """Refresh this worker's row in `workers` and, when due, the `trials` table of a sheet store.

    Called through gsheets.update_views, which finds the backend. Returns the number of requests made.
    """
    from sweeper.storage.gsheets import JournalChanged

    if backend.views is None:
        backend.views = SheetViews(backend)
    try:
        return backend.views.update(study, worker_info)
    except (MayHaveLanded, SheetsUnavailable, SweeperError, APIError) as e:
        # A view can wait for the next update (a protected tab, an outage); the journal cannot.
        if isinstance(e, JournalChanged):
            raise
        backend.stats["views_failed"] += 1
        return 0


def trial_table(study: optuna.Study) -> list[list[Any]]:
    """Header and one row per trial: number, state, params, value, account, GPU, wall time."""
    trials = study.get_trials(deepcopy=False)
    params = [t.params or t.system_attrs.get("fixed_params", {}) for t in trials]
    names = list(dict.fromkeys(name for p in params for name in p))
    rows: list[list[Any]] = [["trial", "state", *names, *TRIAL_COLUMNS_AFTER_PARAMS]]
    for t, p in zip(trials, params):
        worker, result = _attr(t, "worker"), _attr(t, "result")
        rows.append([t.number, t.state.name, *[p.get(n, "") for n in names],
                     "" if t.value is None else t.value, worker.get("account", ""), worker.get("gpu", ""),
                     result.get("wall_time_s", "")])
    return rows


def _attr(trial: optuna.trial.FrozenTrial, key: str) -> dict[str, Any]:
    value = trial.user_attrs.get(key)
    return value if isinstance(value, dict) else {}


def write_headers(api: SheetsClient, spreadsheet_id: str, titles: list[str]) -> None:
    """Headers of freshly added view worksheets, in one request."""
    headers = {TRIALS: ["trial", "state", *TRIAL_COLUMNS_AFTER_PARAMS], WORKERS: WORKER_HEADER}
    data = [{"range": f"{t}!A1", "values": [headers[t]]} for t in titles if t in headers]
    if data:
        api.values_batch_update(spreadsheet_id, {"valueInputOption": "RAW", "data": data})


class SheetViews:
    """One worker's writer of the two views."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self._row: int | None = None  # this worker's row in `workers`
        self._row_values: list[Any] | None = None
        self._row_at = self._trials_at = -math.inf
        self._trial: Any = object()
        self._trials_dirty = True
        self._trials_height = 0

    def update(self, study: optuna.Study, worker_info: Mapping[str, Any]) -> int:
        settings, now = self.backend.settings, time.monotonic()
        if worker_info.get("trial") != self._trial:
            self._trial, self._trials_dirty = worker_info.get("trial"), True
        values = ["" if worker_info.get(k) is None else worker_info.get(k) for k in WORKER_KEYS]
        # GPU hours and the heartbeat ride along; a new trial (or GPU, account...) is worth a request, at most
        # once per views_s (a trial's end and the next one's start are seconds apart).
        changed = values[:5] != (self._row_values or [None] * 5)[:5]
        row_due = (changed and now - self._row_at >= settings.views_s) or now - self._row_at >= settings.heartbeat_s
        trials_due = self._trials_dirty and now - self._trials_at >= settings.views_s
        if not (row_due or trials_due):
            return 0
        heartbeat = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row = [heartbeat if k is None else v for k, v in zip(WORKER_KEYS, values)]
        table = trial_table(study) if trials_due else None
        # The backend's lock only around the writes: reading the study takes the storage's lock, which the
        # heartbeat thread holds while it waits for this one (the other order deadlocks).
        with self.backend._lock:
            try:
                made = self._write(row if row_due else None, table)
            except APIError as e:
                if e.code != 400 or "parse range" not in str(e).lower():
                    raise self.backend._api_error(e) from None
                self.backend._prepare()  # a person deleted a view: add it back and write again
                self._row, self._trials_height = None, 0
                made = 1 + self._write(row if row_due else None, table)
        if row_due:
            self._row_values, self._row_at = values, now
        if trials_due:
            self._trials_dirty, self._trials_at = False, now
        self.backend.stats["views_requests"] += made
        return made

    def _write(self, row: list[Any] | None, table: list[list[Any]] | None) -> int:
        api, sid = self.backend._client(), self.backend.spreadsheet_id
        made, data = 0, []
        if row is not None and self._row is None:
            # First write of this worker's row: an append finds it a row of its own.
            reply = api.values_append(sid, f"{WORKERS}!A:G", params={"valueInputOption": "RAW",
                                                                     "insertDataOption": "INSERT_ROWS"},
                                      body={"values": [row]})
            match = re.search(r"![A-Z]+(\d+)", reply.get("updates", {}).get("updatedRange", ""))
            self._row = int(match.group(1)) if match else None
            made, row = 1, None
        if row is not None:
            data.append({"range": f"{WORKERS}!A{self._row}:G{self._row}", "values": [row]})
        if table is not None:
            width = len(table[0])
            blank = [[""] * width for _ in range(max(0, self._trials_height - len(table)))]
            data.append({"range": f"{TRIALS}!A1", "values": table + blank})
            self._trials_height = len(table)
        if data:
            api.values_batch_update(sid, {"valueInputOption": "RAW", "data": data})
            made += 1
        return made
