"""gsheets://SPREADSHEET_ID: Optuna's journal in a Google Sheet, for many workers under many accounts.

The `journal` worksheet holds one op per row: A op id (writer:counter), B chunk "k/n", C the op's JSON
(split across rows when longer than a cell takes), D when it was written (for people). The `trials` and
`workers` worksheets are views for people (views.py); the journal is the only truth.

Sheets applies each request atomically, and no more: concurrent appends are not documented as
serialized and have been seen to land on the same row; a timed-out append may have landed. So:
- Appends insert rows (INSERT_ROWS: never overwrite) and every row carries an op id. The journal's one
  order is the sheet's row order, each op id counted at its first complete copy (later copies dropped).
- A racing append may still land among rows already visible, for as long as an append takes to land
  (the settle time). A row is replayed only once it is older than that: it was seen by a read sent at least
  the settle time earlier, or it is our own append, answered at least that long ago. Every row before such a
  row is final too: whatever could still land before it started before it was seen, and has landed.
- The settle time follows Google's speed as this worker measures it: SETTLE_FACTOR times the slowest of its
  last round trips (more while it has measured few) and of the racing appends it saw land among rows not yet
  replayed, at least settle_s, at most settle_max_s. A slow day makes every write wait longer; it does not make
  a racing append land among rows already replayed. What no worker has measured yet it cannot wait for: the
  first requests of a process are the exposed ones.
- Read-your-writes: append_logs returns only once its op is replayed. An op whose place matters
  (create a study or trial, claim a waiting trial, finish a trial, study attrs) waits settle_s, is read back
  and replayed in the sheet's order. An op on a trial (param, report, attr) commutes with other workers' ops
  on other trials: once Sheets answers its append it is replayed at once, ahead of foreign rows still
  settling, and the next read checks that it is there; as each foreign row before it settles, it is
  checked to commute with it, and the reader fails loudly if not. Log numbers Optuna has seen never move.
- Every read re-reads the last OVERLAP rows already replayed; if they changed, StoreChanged ("reload
  the study"). A row that does not parse stops the reader with its row number, and it writes no more.
- The writer re-appends an op it cannot find settle_s after appending it (a failed or lost append).
- JournalStorage reads the backend on every call: reads are served from a cache, refreshed when sync_s
  has passed or to confirm our own append. Requests are counted in `stats`.
- Cells: Google holds cell_limit (10 million) cells per spreadsheet, every worksheet's whole grid counted
  (rows x columns), and a new worksheet is 1000 x 26. The journal is made 1 x 4 and grows by the rows appended,
  4 cells each; an older 26-column journal is narrowed once it matters. Once the sheet passes ROOM_WARN_AT of
  the limit the worker says, once, how many trials still fit; a full sheet is a one-line SweeperError.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from optuna.storages.journal import BaseJournalBackend
from optuna.storages.journal._storage import JournalOperation as Op
from optuna.trial import TrialState

from sweeper.errors import StoreChanged, SweeperError, UserError
from sweeper.storage.gsheets.auth import GoogleCredentials, find_credentials

if TYPE_CHECKING:
    from sweeper.storage.gsheets.client import SheetsClient, SheetSettings

log = logging.getLogger(__name__)

JOURNAL, TRIALS, WORKERS = "journal", "trials", "workers"
JOURNAL_HEADER = ["op id", "chunk", "op (Optuna journal JSON)", "written (UTC)"]
JOURNAL_COLUMNS = len(JOURNAL_HEADER)  # the journal's grid is this wide: every row costs this many cells
GOOGLE_COLUMNS = 26  # a worksheet as Google makes it when not told otherwise: 1000 rows x 26 columns
CELL_CHARS = 45_000  # Sheets holds 50,000 characters per cell
OVERLAP = 50  # replayed rows re-read (and checked) by every read
MAX_APPENDS = 6  # tries to get one op into the sheet before giving up
FIRST_ROW = 2  # row 1 is the header
SETTLE_FACTOR, SETTLE_PRIOR = 2.0, 2.0  # settle time = slowest round trip x (FACTOR + PRIOR / round trips measured)
ROOM_CHECK_AT = 0.5  # the sheet's cells are counted (one read) once the journal alone may hold this share of the limit
ROOM_RECHECK = 0.05  # ... and again each time it may have grown by this share
ROOM_WARN_AT = 0.8  # past this share of the limit the worker says how much room is left


@dataclass
class _Own:
    """An op this writer appended that has not yet settled in the sheet's order."""

    log: dict[str, Any]
    text: str
    rows: list[list[str]]
    ahead: bool  # may be replayed before foreign rows that are still settling
    attempts: int = 0
    attempt_at: float = -math.inf  # when the last append came back (answered or failed)
    answered: bool = False
    seen: set[int] = field(default_factory=set)


class SheetJournalBackend(BaseJournalBackend):
    """Optuna's journal in a spreadsheet's `journal` worksheet; see the module docstring for the guarantees."""

    def __init__(self, spreadsheet_id: str, creds: GoogleCredentials | None = None,
                 settings: SheetSettings | None = None, create: bool = True) -> None:
        self.spreadsheet_id = spreadsheet_id
        self.create = create  # False: a sheet without a journal worksheet is refused, never prepared
        self.settings = settings or _sheets().SheetSettings.from_env()
        self._creds = creds
        self._reset()

    def _reset(self) -> None:
        self.lock = threading.RLock()
        self._pid = os.getpid()
        self._writer, self._counter = secrets.token_hex(6), itertools.count()
        self._api: SheetsClient | None = None
        self.stats: Counter[str] = Counter()
        self._final: list[tuple[str, str, int]] = []  # keys of the rows replayed, in sheet order
        self._final_counts: Counter[tuple[str, str, int]] = Counter()
        self._tentative: list[list[str]] = []  # the rows after them, as last read
        self._first_seen: dict[tuple, float] = {}
        self._tentative_seen: list[float] = []  # when each tentative row was first seen
        self._late: deque[float] = deque(maxlen=64)  # how late racing appends landed among tentative rows
        self._ops: list[str] = []  # op JSON as handed to Optuna: log number = index
        self._settled: set[str] = set()  # op ids complete in the sheet's order
        self._ahead: dict[str, dict[str, Any]] = {}  # own ops handed over before settling
        self._chunks: dict[str, dict[int, str]] = {}
        self._own: dict[str, _Own] = {}
        self._last_fetch = -math.inf
        self._opened = False
        self._broken: SweeperError | None = None
        self.views = None  # views.SheetViews, made on first use
        self.grids: dict[str, tuple[int, int, int]] | None = None  # title -> (sheetId, rows, columns), as last read
        self._journal_rows = 0  # the journal's grid rows, from the ranges Google echoes
        self._journal_cols: int | None = None  # its columns, once the sheet's grids were read
        self._other_cells = 0  # the other worksheets' cells, likewise
        self._room_counted = -math.inf  # the cells estimated when they were last counted
        self._room_warned = False
        self._trials_created = 0  # trials created in the ops replayed: journal rows per trial, for the room left

    def __getstate__(self) -> dict[str, Any]:
        # Like Optuna's redis backend: a copy in another process reconnects and replays from the start.
        return {"spreadsheet_id": self.spreadsheet_id, "settings": self.settings, "create": self.create}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._creds = None
        self._reset()

    # ---------------------------------------------------------------------------------------------
    # Optuna's two methods

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        with self.lock:
            self._usable()
            if not self._opened:
                self._open()
            elif time.monotonic() - self._last_fetch >= self.settings.sync_s:
                self._fetch()
            return [json.loads(text) for text in self._ops[log_number_from:]]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self.lock:
            self._usable()
            ids = []
            for log in logs:
                op_id = f"{self._writer}:{next(self._counter)}"
                text = json.dumps(log, separators=(",", ":"))
                chunks = [text[i:i + CELL_CHARS] for i in range(0, len(text), CELL_CHARS)] or [""]
                now = datetime.now(timezone.utc).isoformat(timespec="seconds")
                rows = [[op_id, f"{k + 1}/{len(chunks)}", c, now] for k, c in enumerate(chunks)]
                self._own[op_id] = _Own(log, text, rows, ahead=_may_go_ahead(log))
                ids.append(op_id)
            self._append(ids)  # one request for all of them (Optuna passes one op per call)
            self._await(ids)

    def settle_s(self) -> float:
        """How long a racing append may take to land, by what this worker measured (see the module docstring)."""
        settings = self.settings
        seen = [*(self._api.rtts if self._api is not None else ()), *self._late]
        if not settings.settle_s or not seen:
            return settings.settle_s
        bound = max(seen) * (SETTLE_FACTOR + SETTLE_PRIOR / len(seen))
        return max(settings.settle_s, min(settings.settle_max_s, bound))

    # ---------------------------------------------------------------------------------------------
    # Writing

    def _append(self, ids: list[str]) -> None:
        for op_id in ids:
            own = self._own[op_id]
            own.attempts += 1
            if own.attempts > MAX_APPENDS:
                del self._own[op_id]  # given up on; should a copy still land, it is replayed like any other op
                # An op already replayed ahead may now be missing from the sheet: this view can no longer be trusted.
                self._broken = SweeperError(
                    f"could not get an op into the journal of spreadsheet {self.spreadsheet_id!r} after "
                    f"{MAX_APPENDS} appends; Google Sheets is failing, try again later")
                raise self._broken
        rows = [row for op_id in ids for row in self._own[op_id].rows]
        answered = True
        try:
            reply = self.client().values_append(
                self.spreadsheet_id, f"{JOURNAL}!A:D", params={"valueInputOption": "RAW",
                                                               "insertDataOption": "INSERT_ROWS"},
                body={"values": rows})
        except _sheets().MayHaveLanded:
            answered = False  # verified by reading, never by appending again at once
            self.stats["uncertain_appends"] += 1
        except _sheets().APIError as e:
            for op_id in ids:  # refused: nothing landed, and nothing will be appended again
                self._own.pop(op_id, None)
            if e.code == 400 and "above the limit" in str(e):
                raise self._full(str(e.error.get("message", ""))) from None
            raise self.api_error(e) from None
        for op_id in ids:
            self._own[op_id].attempt_at, self._own[op_id].answered = time.monotonic(), answered
        if answered:
            match = re.search(r"![A-Z]+\d+:[A-Z]+(\d+)$", reply.get("updates", {}).get("updatedRange", ""))
            # INSERT_ROWS adds grid rows for the new ones, wherever the table ends.
            self._journal_rows = max(self._journal_rows + len(rows), int(match.group(1)) if match else 0)
            self._check_room()

    def _await(self, ids: list[str]) -> None:
        """Return once our ops are replayed (read-your-writes); _fetch re-appends any that went missing."""
        for op_id in ids:
            if self._own[op_id].ahead and self._own[op_id].answered:
                # Sheets answered, so the rows are in (INSERT_ROWS overwrites nothing): hand the op over now;
                # the next read checks it is there, and whatever settles before it commutes with it.
                self._go_ahead(op_id)
        settle = self.settle_s()
        wait_until = max((self._own[i].attempt_at + settle for i in ids if i not in self._ahead), default=0.0)
        while any(i not in self._settled and i not in self._ahead for i in ids):
            wait = wait_until - time.monotonic()
            if wait > 0:
                self.stats["settle_waits"] += 1
                self.stats["settle_wait_ms"] += round(wait * 1000)
                time.sleep(wait)
            self._fetch()
            wait_until = time.monotonic() + self.settle_s()

    # ---------------------------------------------------------------------------------------------
    # Reading

    def _open(self) -> None:
        self._fetch()
        if self._tentative and self.settings.settle_s:
            # What the first read saw is final once nothing can still land among it: read the tail again, judged by
            # the settle time known when the wait began (the read's own round trip comes too late to wait for).
            settle = self.settle_s()
            time.sleep(max(0.0, self._last_got + settle - time.monotonic()))
            self._fetch(settle)
        self._opened = True

    def _read(self, start: int) -> list[list[str]]:
        """Journal rows from data index `start` (sheet row start + FIRST_ROW) to the end; from 0, checks the header."""
        self.stats["fetches"] += 1
        rng = f"{JOURNAL}!A{start + FIRST_ROW if start else 1}:D"
        try:
            reply = self.client().values_get(self.spreadsheet_id, rng)
        except _sheets().APIError as e:
            if e.code == 400 and "parse range" in str(e).lower():  # no journal worksheet yet
                if not self.create:
                    self._broken = UserError(f"spreadsheet {self.spreadsheet_id!r} holds no sweeper journal: run "
                                             f"sweeper init --store gsheets://{self.spreadsheet_id} first")
                    raise self._broken
                self.prepare()
                reply = self.client().values_get(self.spreadsheet_id, rng)
            else:
                raise self.api_error(e) from None
        values = reply.get("values", [])
        match = re.search(r":[A-Z]+(\d+)$", reply.get("range", ""))  # an open range comes back bounded by the grid
        if match:
            self._journal_rows = int(match.group(1))
        self.stats["rows_read"] += len(values)
        if start:
            return values
        if not values:  # an empty journal worksheet: make sure row 1 is the header before anything lands there
            self._write_header()
        elif [str(v) for v in values[0][:3]] != JOURNAL_HEADER[:3]:  # a deleted header shifts every op by a row
            raise self._bad_row(1, "it must be the header: " + " | ".join(JOURNAL_HEADER))
        return values[1:]

    def _write_header(self) -> None:
        self.client().values_update(self.spreadsheet_id, f"{JOURNAL}!A1:D1", params={"valueInputOption": "RAW"},
                                     body={"values": [JOURNAL_HEADER]})

    def _fetch(self, settle: float | None = None) -> None:
        final, known = len(self._final), len(self._final) + len(self._tentative)
        start = max(0, known - OVERLAP)
        sent = time.monotonic()
        rows = self._read(start)
        if not self._unchanged(rows, start, known):  # a racing append landed among rows not yet replayed
            self.stats["late_landings"] += 1  # see _unchanged: how late it landed goes into settle_s
            start = max(0, final - OVERLAP)
            rows = self._read(start)
            self._unchanged(rows, start, final)
        self._last_fetch, self._last_got = sent, time.monotonic()
        new = self._tentative[:start - final] + rows if start >= final else rows[final - start:]
        self._advance(new, sent, self.settle_s() if settle is None else settle)
        self._reappend_missing()

    def _unchanged(self, rows: list[list[str]], start: int, known: int) -> bool:
        """Whether rows[0:known-start] are the rows we hold there; a change among replayed rows raises."""
        ours = [_key(r) for r in self._tentative[max(0, start - len(self._final)):]]
        ours = self._final[start:] + ours
        for i, expected in enumerate(ours[:known - start]):
            got = _key(rows[i]) if i < len(rows) else None
            if got != expected:
                if start + i < len(self._final):
                    self._broken = StoreChanged(
                        f"journal of spreadsheet {self.spreadsheet_id!r} changed at row {start + i + FIRST_ROW}, "
                        "which this process had already replayed (rows edited, sorted or deleted by hand, or an "
                        "append that landed late): reload the study")
                    raise self._broken
                # It landed above a row we saw at `seen`, and after our previous read (which did not show it): at
                # least this late. The time since `seen` would include the wait between reads (sync_s).
                seen = self._tentative_seen[start + i - len(self._final)]
                self._late.append(max(0.0, self._last_got - seen))
                return False
        return True

    def _advance(self, new: list[list[str]], sent: float, settle: float) -> None:
        """Replay the rows that are old enough, and everything before them; keep the rest tentative."""
        threshold, got = sent - settle, self._last_got
        keys, local, boundary = [], Counter(), -1
        for j, row in enumerate(new):
            k = _key(row)
            keys.append((*k, self._final_counts[k] + local[k]))  # the n-th copy of a row is a row of its own
            local[k] += 1
            own = self._own.get(k[0])
            if (settle == 0 or self._first_seen.setdefault(keys[-1], got) <= threshold
                    or (own and own.answered and own.attempt_at <= threshold and local[k] == 1
                        and self._final_counts[k] == 0)):
                boundary = j
        for j in range(boundary + 1):
            self._settle(new[j], keys[j], len(self._final) + FIRST_ROW)
        self._tentative = new[boundary + 1:]
        self._first_seen = {key: self._first_seen[key] for key in keys[boundary + 1:]}
        self._tentative_seen = [self._first_seen[key] for key in keys[boundary + 1:]]
        self._hand_over_ahead()

    def _settle(self, row: list[str], key: tuple, sheet_row: int) -> None:
        self._final.append(key[:3])
        self._final_counts[key[:3]] += 1
        op_id, k, n, text = _parse_row(row, sheet_row, self)
        if op_id in self._settled:
            self.stats["duplicates_dropped"] += 1
            return
        parts = self._chunks.setdefault(op_id, {})
        parts.setdefault(k, text)
        if len(parts) < n:
            return
        text = "".join(parts.pop(i) for i in range(1, n + 1)) if n > 1 else parts[1]
        del self._chunks[op_id]
        try:
            log = json.loads(text)
            assert isinstance(log, dict) and isinstance(log.get("op_code"), int)
        except (ValueError, AssertionError):
            raise self._bad_row(sheet_row, "its op is not an Optuna journal entry") from None
        self._settled.add(op_id)
        self._own.pop(op_id, None)
        self._trials_created += log["op_code"] == Op.CREATE_TRIAL
        if self._ahead.pop(op_id, None) is not None:
            return  # handed over earlier; this is where it settled
        for mine in self._ahead.values():
            if not _commute(log, mine):
                self._broken = StoreChanged(
                    f"journal row {sheet_row} of spreadsheet {self.spreadsheet_id!r} landed before an op of this "
                    "worker on the same trial, which was already replayed after it: reload the study")
                raise self._broken
        self._ops.append(text)

    def _hand_over_ahead(self) -> None:
        """Own ops on own trials, present in the sheet, are replayed without waiting for earlier rows to settle."""
        present: dict[str, set[int]] = {}
        for row in self._tentative:
            present.setdefault(row[0] if row else "", set()).add(_chunk_index(row))
        for op_id, own in self._own.items():
            own.seen = present.get(op_id, set()) | set(self._chunks.get(op_id, ()))  # chunks may straddle the frontier
            if own.ahead and op_id not in self._ahead and len(own.seen) == len(own.rows):
                self._go_ahead(op_id)

    def _go_ahead(self, op_id: str) -> None:
        self._ahead[op_id] = self._own[op_id].log
        self._ops.append(self._own[op_id].text)
        self.stats["ops_ahead"] += 1

    def _reappend_missing(self) -> None:
        cutoff = time.monotonic() - self.settle_s()
        missing = [i for i, o in self._own.items() if len(o.seen) < len(o.rows) and o.attempt_at <= cutoff]
        if missing:
            self.stats["reappends"] += len(missing)
            self._append(missing)

    # ---------------------------------------------------------------------------------------------
    # Plumbing

    def _usable(self) -> None:
        if self._broken is not None:
            raise self._broken
        if os.getpid() != self._pid:  # forked: never share op ids or a connection with the parent
            self._pid, self._api = os.getpid(), None
            self._writer, self._counter = secrets.token_hex(6), itertools.count()

    def client(self) -> SheetsClient:
        if self._api is None:
            self._creds = self._creds or find_credentials()
            self._api = _sheets().SheetsClient(self._creds, self.spreadsheet_id, self.settings, self.stats)
        return self._api

    def prepare(self) -> None:
        """Add the journal and view worksheets, with headers; safe when two processes do it at once.

        Each is made as wide as what it holds and one row high (Google's default, 1000 x 26, would make every
        journal row cost 26 cells of the spreadsheet's 10 million); rows come with the appends.
        """
        from sweeper.storage.gsheets.views import VIEW_COLUMNS, write_headers

        api = self.client()
        have = self.sheet_grids()
        missing = [t for t in (JOURNAL, TRIALS, WORKERS) if t not in have]
        if missing:
            widths = {JOURNAL: JOURNAL_COLUMNS, **VIEW_COLUMNS}
            try:
                reply = api.batch_update(self.spreadsheet_id, {"requests": [
                    {"addSheet": {"properties": {"title": t, "gridProperties": {"rowCount": 1,
                                                                                "columnCount": widths[t]}}}}
                    for t in missing]})
            except _sheets().APIError as e:
                if "already exists" not in str(e):
                    raise self._full(str(e.error.get("message", ""))) if "above the limit" in str(e) else \
                        self.api_error(e) from None
                self.grids = None  # another process added them: read again when needed
            else:
                for r in reply.get("replies", []):
                    props = r["addSheet"]["properties"]
                    grid = props.get("gridProperties", {})
                    have[props["title"]] = (props["sheetId"], grid.get("rowCount", 1000),
                                            grid.get("columnCount", GOOGLE_COLUMNS))
        if JOURNAL in missing:
            self._write_header()
        write_headers(api, self.spreadsheet_id, [t for t in missing if t != JOURNAL])
        self._count_room(have)

    def sheet_grids(self) -> dict[str, tuple[int, int, int]]:
        """Each worksheet's (sheetId, rows, columns), read from the spreadsheet's metadata (one read)."""
        sheets = self.client().fetch_sheet_metadata(
            self.spreadsheet_id, params={"fields": "sheets.properties(sheetId,title,gridProperties)"}).get("sheets", [])
        self.grids = {}
        for sheet in sheets:
            props = sheet["properties"]
            grid = props.get("gridProperties", {})
            self.grids[props["title"]] = (props["sheetId"], grid.get("rowCount", 0), grid.get("columnCount", 0))
        return self.grids

    # ---------------------------------------------------------------------------------------------
    # Room: the spreadsheet's cells

    def _check_room(self) -> None:
        """Count the sheet's cells (one read) when the journal may have passed the next share of the limit."""
        limit = self.settings.cell_limit
        estimate = self._other_cells + self._journal_rows * (self._journal_cols or GOOGLE_COLUMNS)
        if estimate >= max(ROOM_CHECK_AT * limit, self._room_counted + ROOM_RECHECK * limit):
            self._count_room(self.sheet_grids())

    def _count_room(self, grids: dict[str, tuple[int, int, int]]) -> None:
        """Narrow a journal made wider than it needs (older sheets), then say how much room is left past
        ROOM_WARN_AT of the limit, once."""
        if JOURNAL not in grids:
            return
        sheet_id, rows, cols = grids[JOURNAL]
        if cols > JOURNAL_COLUMNS and self._narrow_journal(sheet_id, cols):
            cols = JOURNAL_COLUMNS
            grids[JOURNAL] = sheet_id, rows, cols
        total = sum(r * c for _, r, c in grids.values())
        self._journal_rows, self._journal_cols = max(self._journal_rows, rows), cols
        self._other_cells, self._room_counted = total - rows * cols, total
        limit = self.settings.cell_limit
        if total >= ROOM_WARN_AT * limit and not self._room_warned:
            self._room_warned = True
            log.warning(self.room_left(total))

    def _narrow_journal(self, sheet_id: int, cols: int) -> bool:
        """Drop the journal's columns past D (26 cells a row -> 4), when nobody wrote in them."""
        api, last = self.client(), _column(cols)
        if api.values_get(self.spreadsheet_id, f"{JOURNAL}!E:{last}").get("values"):
            return False  # someone keeps notes there: leave them
        api.batch_update(self.spreadsheet_id, {"requests": [{"updateSheetProperties": {
            "properties": {"sheetId": sheet_id, "gridProperties": {"columnCount": JOURNAL_COLUMNS}},
            "fields": "gridProperties.columnCount"}}]})  # idempotent, unlike deleteDimension, if retried
        self.stats["journal_narrowed"] += 1
        log.info("journal of spreadsheet %r narrowed from %d to %d columns: each row now costs %d cells of the "
                 "spreadsheet's %s", self.spreadsheet_id, cols, JOURNAL_COLUMNS, JOURNAL_COLUMNS,
                 f"{self.settings.cell_limit:,}")
        return True

    def room_left(self, total: int) -> str:
        """One line: the cells used, and how many journal rows and trials still fit."""
        limit, cols = self.settings.cell_limit, self._journal_cols or JOURNAL_COLUMNS
        rows_left = max(0, limit - total) // cols
        per_trial = len(self._final) / self._trials_created if self._trials_created else None
        trials = f", about {int(rows_left / per_trial):,} trials at {per_trial:.0f} rows a trial" if per_trial else ""
        return (f"spreadsheet {self.spreadsheet_id!r} uses {total:,} of the {limit:,} cells Google allows "
                f"({100 * total / limit:.0f}%): room for {rows_left:,} more journal rows{trials}; when it is full "
                "every write to the study fails: start further studies in a new spreadsheet")

    def _full(self, message: str) -> SweeperError:
        match = re.search(r"limit of (\d+) cells", message)
        limit = int(match.group(1)) if match else self.settings.cell_limit
        rows = f" (the journal has {self._journal_rows - 1:,} rows)" if self._journal_rows > 1 else ""
        return SweeperError(f"spreadsheet {self.spreadsheet_id!r} is full: Google Sheets holds {limit:,} cells over "
                            f"all its worksheets and refused to add more{rows}; start further studies in a new "
                            "spreadsheet, or delete worksheets of this one you no longer need")

    def api_error(self, e: Exception) -> SweeperError:
        status = getattr(getattr(e, "response", None), "status_code", e.code)  # e.code is -1 for a non-JSON answer
        return SweeperError(f"Google Sheets refused a request to spreadsheet {self.spreadsheet_id!r} "
                            f"(HTTP {status}): {(str(e.error.get('message', '')).splitlines() or [''])[0][:300]}")

    def _bad_row(self, sheet_row: int, why: str) -> SweeperError:
        self._broken = SweeperError(
            f"journal row {sheet_row} of spreadsheet {self.spreadsheet_id!r} does not parse ({why}): someone "
            "edited the journal worksheet; restore it from File > Version history, then reload the study")
        return self._broken


def _sheets():
    """The HTTP layer, imported on first use: gspread and google-auth add 0.35 s to every `sweeper` command."""
    from sweeper.storage.gsheets import client

    return client


def _column(index: int) -> str:
    """The letters of the 1-based column `index`: 1 -> A, 26 -> Z, 27 -> AA."""
    letters = ""
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(65 + rem) + letters
    return letters


def _key(row: list[str]) -> tuple[str, str, int]:
    """What identifies a row: op id, chunk, and a checksum of the op's text."""
    a, b, c = (str(row[i]) if i < len(row) else "" for i in range(3))
    return a, b, zlib.crc32(c.encode())


def _chunk_index(row: list[str]) -> int:
    m = re.fullmatch(r"(\d+)/\d+", str(row[1])) if len(row) > 1 else None
    return int(m.group(1)) if m else -1


def _parse_row(row: list[str], sheet_row: int, backend: SheetJournalBackend) -> tuple[str, int, int, str]:
    if len(row) < 3 or not row[0] or not row[2]:
        raise backend._bad_row(sheet_row, "it lacks an op id, a chunk number or the op" if row else "it is empty")
    m = re.fullmatch(r"(\d+)/(\d+)", str(row[1]))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise backend._bad_row(sheet_row, f"chunk {str(row[1])[:20]!r} is not k/n")
    return str(row[0]), int(m.group(1)), int(m.group(2)), str(row[2])


def _may_go_ahead(log: dict[str, Any]) -> bool:
    """Ops on an existing trial that commute with other workers' ops on other trials. A finish (tell, or a
    takeover failing a stale trial) waits for its place: of two workers finishing one trial, the sheet's
    order decides which did, the same for both (sweeper/leases.py relies on it)."""
    return log.get("op_code") in (Op.SET_TRIAL_PARAM, Op.SET_TRIAL_INTERMEDIATE_VALUE, Op.SET_TRIAL_USER_ATTR,
                                  Op.SET_TRIAL_SYSTEM_ATTR)


def _commute(settled: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether replaying `settled` before or after `mine` (an op _may_go_ahead allows) leaves the same state."""
    if settled.get("op_code") == Op.DELETE_STUDY:
        return False
    if mine["op_code"] == Op.SET_TRIAL_PARAM:  # a param's distribution is checked against earlier trials' ones
        name, dist = mine["param_name"], mine["distribution"]
        if settled.get("op_code") == Op.SET_TRIAL_PARAM and settled["param_name"] == name \
                and settled["distribution"] != dist:
            return False
        if name in (settled.get("distributions") or {}) and settled["distributions"][name] != dist:
            return False
    if settled.get("trial_id") == mine["trial_id"]:
        # Another worker's claim of this (running) trial is rejected in either order; anything else on it is a
        # takeover racing this worker, where the order decides.
        return settled.get("op_code") == Op.SET_TRIAL_STATE_VALUES and settled["state"] == TrialState.RUNNING
    return True  # other trials; create study/trial and study attrs carry no trial_id
