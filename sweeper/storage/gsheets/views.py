"""The `trials` and `workers` worksheets: live views of a gsheets study for people, never read back.

The journal is the only truth; deleting a view loses nothing (the next update recreates it). To spare the
per-minute quota, each worker makes at most one request per update (three the first time: its row, the grids'
sizes, the table), and one more when the `trials` grid must grow: the `trials` table only when its own trial
changed (started or ended), its `workers` row when its trial changed; each at most once per views_s, and the row
at least once per heartbeat_s (GPU hours and the heartbeat time ride along with those writes).

What Google does that this is written for: a write past a worksheet's grid is refused (400 "exceeds grid
limits"), so the `trials` grid is grown first (appendDimension); a null cell in a write is skipped, not cleared,
so a cell to clear is sent as ""; JSON has no infinity or NaN, so those go as text. A failed write (an outage, a
refusal) is not resent at every update: the next try waits views_s, then twice as long each time, up to an hour.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import optuna
from gspread.exceptions import APIError

from sweeper.errors import StoreChanged, SweeperError
from sweeper.record import params_of, result_of, worker_of
from sweeper.storage.gsheets.client import MayHaveLanded, SheetsClient, SheetsUnavailable

TRIALS, WORKERS = "trials", "workers"
WORKER_HEADER = ["worker", "account", "platform", "GPU", "current trial", "last heartbeat (UTC)", "GPU hours"]
WORKER_KEYS = ["worker", "account", "platform", "gpu", "trial", None, "gpu_hours"]  # None: the heartbeat
TRIAL_COLUMNS_AFTER_PARAMS = ["value", "account", "GPU", "wall s"]
VIEW_COLUMNS = {TRIALS: 2 + len(TRIAL_COLUMNS_AFTER_PARAMS), WORKERS: len(WORKER_HEADER)}  # as each is created
ROWS_HEADROOM = 100  # rows added to `trials` beyond what the table needs, so that it grows once per 100 trials
RETRY_CAP_S = 3600.0  # the longest a failed view write waits before it is tried again


def update_backend_views(backend, study: optuna.Study, worker_info: Mapping[str, Any]) -> int:
    """Refresh this worker's row in `workers` and, when due, the `trials` table of a sheet store.

    `backend` is the store's SheetJournalBackend (journal.py). Returns the number of requests made.
    """
    if backend.views is None:
        backend.views = SheetViews(backend)
    try:
        return backend.views.update(study, worker_info)
    except (MayHaveLanded, SheetsUnavailable, SweeperError, APIError) as e:
        # A view can wait for the next update (a protected tab, an outage); the journal cannot.
        if isinstance(e, StoreChanged):
            raise
        backend.stats["views_failed"] += 1
        return 0


def trial_table(study: optuna.Study) -> list[list[Any]]:
    """Header and one row per trial: number, state, params, value, account, GPU, wall time."""
    trials = study.get_trials(deepcopy=False)
    params = [params_of(t) for t in trials]
    names = list(dict.fromkeys(name for p in params for name in p))
    rows: list[list[Any]] = [["trial", "state", *names, *TRIAL_COLUMNS_AFTER_PARAMS]]
    for t, p in zip(trials, params):
        worker, result = worker_of(t), result_of(t)
        rows.append([_cell(v) for v in (t.number, t.state.name, *[p.get(n) for n in names], t.value,
                                        worker.get("account"), worker.get("gpu"), result.get("wall_time_s"))])
    return rows


def _cell(value: Any) -> Any:
    """A value as a cell takes it: "" for none (Google skips a null, leaving what the cell held), text for an
    infinity or NaN (JSON has neither), text for anything that is not a string, bool or finite number."""
    if value is None:
        return ""
    if isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else str(float(value))
    return str(value)


def write_headers(api: SheetsClient, spreadsheet_id: str, titles: list[str]) -> None:
    """Headers of freshly added view worksheets, in one request."""
    headers = {TRIALS: ["trial", "state", *TRIAL_COLUMNS_AFTER_PARAMS], WORKERS: WORKER_HEADER}
    data = [{"range": f"{t}!A1", "values": [headers[t]]} for t in titles if t in headers]
    if data:
        api.values_batch_update(spreadsheet_id, {"valueInputOption": "RAW", "data": data})


class SheetViews:
    """One worker's writer of the two views."""

    def __init__(self, backend, clock: Callable[[], float] = time.monotonic) -> None:
        self.backend, self.clock = backend, clock
        self._row: int | None = None  # this worker's row in `workers`
        self._row_values: list[Any] | None = None
        self._row_at = self._trials_at = -math.inf
        self._trial: Any = object()
        self._trials_dirty = True
        self._trials_height: int | None = None  # rows of `trials` this process wrote; None: as many as the grid
        self._failures, self._retry_at = 0, -math.inf

    def update(self, study: optuna.Study, worker_info: Mapping[str, Any]) -> int:
        settings, now = self.backend.settings, self.clock()
        if worker_info.get("trial") != self._trial:
            self._trial, self._trials_dirty = worker_info.get("trial"), True
        if now < self._retry_at:  # the last write failed: not resent at every update
            return 0
        values = [_cell(worker_info.get(k)) for k in WORKER_KEYS]
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
        with self.backend.lock:
            try:
                made = self._write_or_recreate(row if row_due else None, table)
            except (APIError, MayHaveLanded, SheetsUnavailable, SweeperError) as e:
                self._failures += 1
                self._retry_at = now + min(RETRY_CAP_S, max(1.0, settings.views_s) * 2 ** (self._failures - 1))
                if isinstance(e, APIError):
                    self.backend.grids = None  # a refused write may have been aimed by stale grid sizes
                    raise self.backend.api_error(e) from None
                raise
        self._failures = 0
        if row_due:
            self._row_values, self._row_at = values, now
        if trials_due:
            self._trials_dirty, self._trials_at = False, now
        self.backend.stats["views_requests"] += made
        return made

    def _write_or_recreate(self, row: list[Any] | None, table: list[list[Any]] | None) -> int:
        try:
            return self._write(row, table)
        except APIError as e:
            if e.code != 400 or "parse range" not in str(e).lower():
                raise
        self.backend.prepare()  # a person deleted a view: add it back and write again
        self._row, self._trials_height = None, None
        return 1 + self._write(row, table)

    def _write(self, row: list[Any] | None, table: list[list[Any]] | None) -> int:
        api, sid = self.backend.client(), self.backend.spreadsheet_id
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
            made += self._fit_trials(len(table), len(table[0]))
            blank = [[""] * len(table[0]) for _ in range(max(0, self._trials_height - len(table)))]
            data.append({"range": f"{TRIALS}!A1", "values": table + blank})
            self._trials_height = len(table)
        if data:
            api.values_batch_update(sid, {"valueInputOption": "RAW", "data": data})
            made += 1
        return made

    def _fit_trials(self, height: int, width: int) -> int:
        """Grow the `trials` grid to hold a table of height x width (Google refuses a write past the grid);
        the requests made. The first time, the rows the grid already has are to be cleared too."""
        made, grids = 0, self.backend.grids
        if grids is None or TRIALS not in grids:
            grids, made = self.backend.sheet_grids(), 1
            if TRIALS not in grids:  # a person deleted it: add it back
                self.backend.prepare()
                grids, made, self._trials_height = self.backend.grids or self.backend.sheet_grids(), made + 2, None
        sheet_id, rows, cols = grids[TRIALS]
        if self._trials_height is None:
            self._trials_height = rows  # what another process (or study) left there
        grow = []
        if height > rows:
            grow.append({"appendDimension": {"sheetId": sheet_id, "dimension": "ROWS",
                                             "length": height - rows + ROWS_HEADROOM}})
        if width > cols:
            grow.append({"appendDimension": {"sheetId": sheet_id, "dimension": "COLUMNS", "length": width - cols}})
        if grow:  # appendDimension adds to what is there: two workers growing at once never shrink it
            self.backend.client().batch_update(self.backend.spreadsheet_id, {"requests": grow})
            grids[TRIALS] = (sheet_id, max(rows, height + ROWS_HEADROOM), max(cols, width))
            made += 1
        return made
