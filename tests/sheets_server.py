"""A local stand-in for the Google Sheets v4 API and Google's OAuth token endpoint, for tests and benchmarks.

It serves what the gsheets store uses: spreadsheets.get, spreadsheets.batchUpdate (addSheet, appendDimension,
updateSheetProperties of the grid), values.get / batchGet / update / batchUpdate / append, and the
service-account token flow (a JWT signed with the account's private key, verified here against its public
key), so the real gspread and google-auth code runs against it. What the real service does that it
reproduces, each switchable, with where each behaviour is documented or was recorded:
- per-user read and write quotas per window, answering 429 (Google: 60 a minute each); windows timed by
  the wall clock, or by a RequestClock for a test that must not depend on the machine's speed;
- 401 for revoked credentials, 403 for a sheet not shared with the caller, 404 for a wrong id;
- injected faults at `fault_rate`: a 500 before doing anything; a 429; a 408 before doing anything, as an
  HTML page, not JSON (tidyverse/googlesheets4#187, "Error 408 (Request Timeout)!!1"; gspread's
  BackOffHTTPClient retries 408: gspread/http_client.py); "timeout": applied, and the answer never comes
  (the client times out); "drop": applied, and the connection is closed without an answer (the same without
  waiting for a timeout); "late": applied 2 x hang_s after the client gave up (a retried append lands twice);
- grids. A worksheet is a grid of rowCount x columnCount cells: 1000 x 26 unless addSheet says otherwise
  (gspread's recordings: tests/cassettes/SpreadsheetTest.test_add_del_worksheet.json, a new spreadsheet's
  Sheet1 1000 x 26 and an addSheet with gridProperties 1 x 1 answered 1 x 1; sheets.v4 discovery document,
  AddSheetRequest: "All properties are optional"). An append grows the grid by the rows it inserts
  (INSERT_ROWS: "Rows are inserted for the new data", and the row is as wide as the grid) or writes past its
  end, and by columns when wider; appendDimension and updateSheetProperties change it. A values.update or
  values.batchUpdate past the grid is refused: 400 "Range (all_apis!A2320:Z12320) exceeds grid limits. Max
  rows: 2319, max columns: 26" (googleapis/sloth#1096), in a batch prefixed "Invalid data[0]: " (recorded
  in public code). A values.get of an open range answers with the range bounded by the grid ('Sheet1'!A1:A
  -> "Sheet1!A1:A1000": gspread's tests/cassettes/WorksheetTest.test_delete_cols.json);
- 10 million cells per spreadsheet, every worksheet's whole grid counted (`cell_limit`): anything that would
  pass it is refused with 400 "This action would increase the number of cells in the workbook above the limit
  of 10000000 cells." (burnash/gspread#516 on an append; nithinmurali/pygsheets#589 with the prefix "Invalid
  requests[0].updateSheetProperties: " in a batchUpdate); Google applies a new rowCount before checking, so
  only the final size counts (robin900/gspread-dataframe#38);
- a null cell in an update or append is skipped: the cell keeps what it held (sheets.v4 discovery document,
  ValueRange.values: "Null values will be skipped. To set a cell to an empty value, set the string value to
  an empty string."); 50,000 characters per cell;
- latency per request: google_latency() is Google as seen from a notebook (docs/design.md: 0.15-0.5 s, tails of
  seconds; googlesheets4#187 saw minutes), scaled by one factor in tests;
- append modes. "serialized": each append picks its row and writes it in one step. "racy": an append
  picks its row when it arrives and writes when it lands, so concurrent appends aim at the same row:
  with insertDataOption=OVERWRITE the later one overwrites the earlier (as users report); with
  INSERT_ROWS the later one is inserted there, before the earlier one.
Reads past the grid, and most of the API, are not modelled.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import math
import random
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

HANG, DROP = object(), object()  # answer after hang_s by closing the connection; close it at once
CELL_LIMIT = 50_000  # characters
CELLS_PER_SPREADSHEET = 10_000_000
NEW_GRID = (1000, 26)  # rows, columns of a worksheet made without gridProperties
HTML_408 = (b"<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
            b"  <title>Error 408 (Request Timeout)!!1</title>\n  <p><b>408.</b> <ins>That's an error.</ins>\n")


def google_latency(scale: float = 1.0) -> Callable[[random.Random], float]:
    """Seconds a Sheets request takes, times `scale`: log-normal around 0.27 s (0.16-0.44 s for 9 requests in 10,
    at most 1 s), and a tail: 1 request in 20 takes 1-3 s."""

    def draw(rng: random.Random) -> float:
        if rng.random() < 0.05:
            return scale * rng.uniform(1.0, 3.0)
        return scale * min(1.0, rng.lognormvariate(math.log(0.27), 0.3))

    return draw


@dataclass
class Sheet:
    sheet_id: int
    title: str
    row_count: int = NEW_GRID[0]
    col_count: int = NEW_GRID[1]
    rows: list[list[Any]] = field(default_factory=list)
    seq: int = 0
    commits: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, row index, rows inserted)


class RequestClock:
    """A clock that advances `step_s` each time it is read (once per request): quota windows then hold a fixed
    number of requests, so a test of the quota gets the same 429s on a busy machine as on an idle one."""

    def __init__(self, step_s: float):
        self.step_s, self.now, self._lock = step_s, 0.0, threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.now += self.step_s
            return self.now


class ApiError(Exception):
    def __init__(self, code: int, status: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.status, self.message, self.headers = code, status, message, headers or {}


def _too_many_cells(limit: int, where: str = "") -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", f"{where}This action would increase the number of cells in the workbook "
                                             f"above the limit of {limit} cells.")


class FakeSheets:
    """Start with `with FakeSheets(...) as fake:`; fake.url is the API root for SWEEPER_GSHEETS_ENDPOINT."""

    def __init__(self, mode: str = "serialized",
                 latency: tuple[float, float] | Callable[[random.Random], float] = (0.0, 0.0),
                 fault_rate: float = 0.0, faults: tuple[str, ...] = ("500", "429", "408", "timeout"),
                 hang_s: float = 1.0, read_quota: int | None = None, write_quota: int | None = None,
                 quota_window_s: float = 60.0, seed: int | None = None, record: bool = False,
                 clock: Callable[[], float] = time.time, cell_limit: int = CELLS_PER_SPREADSHEET):
        """latency: (lo, hi) seconds, uniform, or a function of a random.Random (google_latency(scale))."""
        assert mode in ("serialized", "racy")
        self.clock = clock  # what quota windows and recorded events are timed by
        self.mode, self.latency, self.fault_rate, self.faults, self.hang_s = mode, latency, fault_rate, faults, hang_s
        self.cell_limit = cell_limit
        self.quota = {"reads": read_quota, "writes": write_quota}
        self.quota_window_s = quota_window_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.accounts: dict[str, Any] = {}  # email -> public key
        self.revoked: set[str] = set()
        self.tokens: dict[str, str] = {}  # access token -> email
        self.spreadsheets: dict[str, dict[str, Any]] = {}
        self.stats: Counter[str] = Counter()
        self.events: list[tuple[float, str, str]] | None = [] if record else None  # (time, email, reads|writes)
        self._used: Counter[tuple[str, str, int]] = Counter()
        self._race: dict[str, Any] | None = None
        self._injected: list[tuple[str, str]] = []  # (fault, path fragment) for the next matching requests
        self.max_land_s = 0.0  # longest an append took from picking its row to writing it
        self.busy = 0  # requests being served
        self.url = ""

    # ---------------------------------------------------------------------------------------------
    # Set-up, from the test

    def __enter__(self) -> FakeSheets:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request is being served (late faults still landing, hung answers)."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.02)

    def add_service_account(self, email: str | None = None) -> dict[str, str]:
        """A service account the token endpoint knows; returns its JSON key file as a dict."""
        email = email or f"worker-{secrets.token_hex(3)}@fake-project.iam.gserviceaccount.com"
        key = _private_key()
        self.accounts[email] = key.public_key()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        return {"type": "service_account", "project_id": "fake-project", "private_key_id": secrets.token_hex(20),
                "private_key": pem, "client_email": email, "client_id": "1",
                "token_uri": f"{self.url}/token", "auth_uri": f"{self.url}/auth"}

    def add_spreadsheet(self, editors: list[str] | tuple[str, ...] = (), sid: str | None = None) -> str:
        sid = sid or secrets.token_urlsafe(30).replace("-", "x").replace("_", "y")
        self.spreadsheets[sid] = {"title": "sweep", "sheets": {"Sheet1": Sheet(0, "Sheet1")}, "editors": set(editors)}
        return sid

    def add_sheet(self, sid: str, title: str, rows: int = NEW_GRID[0], cols: int = NEW_GRID[1]) -> None:
        """A person adds a worksheet (Google's default grid: 1000 x 26)."""
        with self.lock:
            sheets = self.spreadsheets[sid]["sheets"]
            sheets[title] = Sheet(max((s.sheet_id for s in sheets.values()), default=-1) + 1, title, rows, cols)

    def grid(self, sid: str, title: str) -> tuple[int, int]:
        with self.lock:
            sheet = self.spreadsheets[sid]["sheets"][title]
            return sheet.row_count, sheet.col_count

    def cells(self, sid: str) -> int:
        """The cells of the spreadsheet, as Google counts them against the limit: every grid, whole."""
        with self.lock:
            return _cells(self.spreadsheets[sid])

    def revoke(self, email: str) -> None:
        with self.lock:
            self.revoked.add(email)
            self.tokens = {t: e for t, e in self.tokens.items() if e != email}

    def rows(self, sid: str, title: str) -> list[list[Any]]:
        with self.lock:
            return [list(r) for r in self.spreadsheets[sid]["sheets"][title].rows]

    def set_row(self, sid: str, title: str, row_number: int, values: list[Any]) -> None:
        """A person edits row `row_number` (1-based) by hand."""
        with self.lock:
            sheet = self.spreadsheets[sid]["sheets"][title]
            sheet.rows.extend([] for _ in range(row_number - len(sheet.rows)))
            sheet.rows[row_number - 1] = list(values)
            sheet.row_count, sheet.col_count = max(sheet.row_count, row_number), max(sheet.col_count, len(values))

    def delete_sheet(self, sid: str, title: str) -> None:
        with self.lock:
            del self.spreadsheets[sid]["sheets"][title]

    def inject(self, fault: str, where: str = ":append", n: int = 1) -> None:
        """The next n requests whose path contains `where` get `fault` ("500", "429", "408", "timeout", "drop",
        "late")."""
        with self.lock:
            self._injected += [(fault, where)] * n

    @contextlib.contextmanager
    def race(self, n: int):
        """The next n appends pick their row together, then land one by one in the order they arrived."""
        self._race = {"barrier": threading.Barrier(n), "n": n, "arrived": 0, "turn": 0,
                      "cond": threading.Condition()}
        try:
            yield
        finally:
            self._race = None

    # ---------------------------------------------------------------------------------------------
    # Requests

    def handle(self, method: str, path: str, body: bytes, headers) -> Any:
        url = urlsplit(path)
        query = parse_qs(url.query)
        try:
            if url.path == "/token":
                return 200, self._token(parse_qs(body.decode())), {}
            email = self._authenticate(headers.get("Authorization", ""))
            kind = "reads" if method == "GET" else "writes"
            self._count(email, kind)
            fault = self._fault(kind, path)
            if fault == "408":  # Google's front end, before the request reaches Sheets: an HTML page
                self._sleep()
                return 408, HTML_408, {"Content-Type": "text/html; charset=UTF-8"}
            if fault == "late":  # the client gives up long before the request is applied
                time.sleep(2 * self.hang_s)
            payload = self._route(method, url.path, query, json.loads(body) if body else {}, email)
            return DROP if fault in ("late", "drop") else HANG if fault == "timeout" else (200, payload, {})
        except ApiError as e:
            return e.code, {"error": {"code": e.code, "message": e.message, "status": e.status}}, e.headers

    def _authenticate(self, authorization: str) -> str:
        with self.lock:
            email = self.tokens.get(authorization.removeprefix("Bearer "))
        if email is None:
            raise ApiError(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 "
                                                   "access token, login cookie or other valid authentication credential.")
        return email

    def _count(self, email: str, kind: str) -> None:
        now = self.clock()
        with self.lock:
            self.stats[kind] += 1
            if self.events is not None:
                self.events.append((now, email, kind))
            window = (email, kind, int(now / self.quota_window_s))
            self._used[window] += 1
            limit = self.quota[kind]
            over = limit is not None and self._used[window] > limit
            if over:
                self.stats["429_quota"] += 1
        if over:
            metric = "Read requests" if kind == "reads" else "Write requests"
            raise ApiError(429, "RESOURCE_EXHAUSTED", f"Quota exceeded for quota metric '{metric}' and limit "
                                                      f"'{metric} per minute per user' of service 'sheets.googleapis.com'")

    def _fault(self, kind: str, path: str) -> str | None:
        with self.lock:
            fault = self.rng.choice(self.faults) if self.faults and self.rng.random() < self.fault_rate else None
            for i, (injected, where) in enumerate(self._injected):
                if where in path:
                    fault = injected
                    del self._injected[i]
                    break
            if fault:
                self.stats[f"fault_{fault}"] += 1
        if fault == "500":
            raise ApiError(500, "INTERNAL", "Internal error encountered.")
        if fault == "429":
            raise ApiError(429, "RESOURCE_EXHAUSTED", "Quota exceeded (injected).", {"Retry-After": "0"})
        return fault

    def _sleep(self) -> None:
        if callable(self.latency):
            with self.lock:
                seconds = self.latency(self.rng)
        else:
            lo, hi = self.latency
            seconds = self.rng.uniform(lo, hi) if hi > 0 else 0.0
        if seconds > 0:
            with self.lock:
                self.stats["latency_ms"] += round(seconds * 1000)
            time.sleep(seconds)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: dict, email: str) -> dict:
        m = re.fullmatch(r"/v4/spreadsheets/([^/:]+)(:batchUpdate|/values:batchGet|/values:batchUpdate|/values/(.+))?",
                         path)
        if not m:
            raise ApiError(404, "NOT_FOUND", f"no such endpoint {path}")
        sid, what, rng = m.group(1), m.group(2) or "", m.group(3)
        book = self.spreadsheets.get(sid)
        if book is None:
            raise ApiError(404, "NOT_FOUND", "Requested entity was not found.")
        if email not in book["editors"]:
            raise ApiError(403, "PERMISSION_DENIED", "The caller does not have permission")
        if rng is not None and rng.endswith(":append") and method == "POST":
            return self._append(sid, book, unquote(rng[:-len(":append")]), query, body)
        self._sleep()
        with self.lock:
            if what == "" and method == "GET":
                return self._metadata(sid, book)
            if what == ":batchUpdate":
                return self._batch_update(sid, book, body)
            if what == "/values:batchGet":
                return {"spreadsheetId": sid, "valueRanges": [self._get(book, r) for r in query.get("ranges", [])]}
            if what == "/values:batchUpdate":  # all or nothing: every range is checked before any is written
                data = body.get("data", [])
                for i, d in enumerate(data):
                    self._update(book, d["range"], d["values"], where=f"Invalid data[{i}]: ", check_only=True)
                replies = [self._update(book, d["range"], d["values"]) for d in data]
                return {"spreadsheetId": sid, "totalUpdatedCells": sum(r["updatedCells"] for r in replies),
                        "responses": replies}
            if rng is not None and method == "GET":
                return self._get(book, unquote(rng))
            if rng is not None and method == "PUT":
                return {"spreadsheetId": sid, **self._update(book, unquote(rng), body.get("values", []))}
        raise ApiError(400, "INVALID_ARGUMENT", f"unsupported {method} {path}")

    # ---------------------------------------------------------------------------------------------
    # The endpoints (called with self.lock held, except _append, which takes it itself)

    def _metadata(self, sid: str, book: dict) -> dict:
        sheets = [{"properties": {"sheetId": s.sheet_id, "title": s.title, "index": i, "sheetType": "GRID",
                                  "gridProperties": {"rowCount": s.row_count, "columnCount": s.col_count}}}
                  for i, s in enumerate(book["sheets"].values())]
        return {"spreadsheetId": sid, "properties": {"title": book["title"]}, "sheets": sheets}

    def _batch_update(self, sid: str, book: dict, body: dict) -> dict:
        """addSheet, appendDimension, updateSheetProperties (gridProperties): all or nothing, like the real thing,
        the cells counted once every request is applied."""
        sizes = {s.title: [s.row_count, s.col_count] for s in book["sheets"].values()}
        by_id = {s.sheet_id: s.title for s in book["sheets"].values()}
        added: list[tuple[int, str]] = []
        for i, r in enumerate(body.get("requests", [])):
            (kind, req), = r.items()
            where = f"Invalid requests[{i}].{kind}: "
            if kind == "addSheet":
                props = req.get("properties", {})
                title, grid = props.get("title"), props.get("gridProperties", {})
                if title in sizes:
                    raise ApiError(400, "INVALID_ARGUMENT", f'{where}A sheet with the name "{title}" already exists. '
                                                            "Please enter another name.")
                sizes[title] = [grid.get("rowCount", NEW_GRID[0]), grid.get("columnCount", NEW_GRID[1])]
                sheet_id = max([*by_id, *(a for a, _ in added)], default=0) + 1
                added.append((sheet_id, title))
                by_id[sheet_id] = title
            elif kind in ("appendDimension", "updateSheetProperties"):
                sheet_id = req.get("sheetId", req.get("properties", {}).get("sheetId"))
                if sheet_id not in by_id:
                    raise ApiError(400, "INVALID_ARGUMENT", f"{where}No grid with id: {sheet_id}")
                size = sizes[by_id[sheet_id]]
                if kind == "appendDimension":
                    size[req["dimension"] == "COLUMNS"] += req["length"]
                else:
                    grid, fields = req["properties"].get("gridProperties", {}), req.get("fields", "")
                    for j, name in enumerate(("rowCount", "columnCount")):
                        if name in grid and (name in fields or fields == "*"):
                            size[j] = grid[name]
            else:
                raise ApiError(400, "INVALID_ARGUMENT", f"Invalid requests[{i}]: {kind} is not supported here")
            if sum(r * c for r, c in sizes.values()) > self.cell_limit and \
                    sum(r * c for r, c in sizes.values()) > _cells(book):
                raise _too_many_cells(self.cell_limit, where)
        replies = []
        for sheet_id, title in added:
            book["sheets"][title] = Sheet(sheet_id, title, *sizes[title])
        for r in body.get("requests", []):
            (kind, req), = r.items()
            if kind == "addSheet":
                sheet = book["sheets"][req["properties"]["title"]]
                replies.append({"addSheet": {"properties": {
                    "sheetId": sheet.sheet_id, "title": sheet.title, "sheetType": "GRID",
                    "gridProperties": {"rowCount": sheet.row_count, "columnCount": sheet.col_count}}}})
            else:
                replies.append({})
        for sheet in book["sheets"].values():
            sheet.row_count, sheet.col_count = sizes[sheet.title]
            del sheet.rows[sheet.row_count:]
            for row in sheet.rows:
                del row[sheet.col_count:]
        return {"spreadsheetId": sid, "replies": replies}

    def _get(self, book: dict, a1: str) -> dict:
        sheet, r0, c0, r1, c1, single = self._range(book, a1)
        rows = sheet.rows[r0:None if r1 is None else r1 + 1]
        values = [[_formatted(v) for v in row[c0:None if c1 is None else c1 + 1]] for row in rows]
        values = [row[:max((i + 1 for i, v in enumerate(row) if v != ""), default=0)] for row in values]
        while values and not values[-1]:
            values.pop()
        last_row, last_col = sheet.row_count if r1 is None else r1 + 1, sheet.col_count - 1 if c1 is None else c1
        bounded = a1 if single else f"{a1.split('!')[0]}!{_col(c0)}{r0 + 1}:{_col(last_col)}{last_row}"
        reply = {"range": bounded, "majorDimension": "ROWS"}
        if values:
            reply["values"] = values
        return reply

    def _update(self, book: dict, a1: str, values: list[list[Any]], where: str = "", check_only: bool = False) -> dict:
        sheet, r0, c0, r1, c1, single = self._range(book, a1)
        _check_cells(values)
        height, width = len(values), max((len(v) for v in values), default=0)
        if not single and ((r1 is not None and r0 + height - 1 > r1) or (c1 is not None and c0 + width - 1 > c1)):
            raise ApiError(400, "INVALID_ARGUMENT", f"Requested writing within range [{a1}], but tried writing "
                                                    "beyond it")
        if height and width and (r0 + height > sheet.row_count or c0 + width > sheet.col_count):
            written = f"{a1.split('!')[0]}!{_col(c0)}{r0 + 1}:{_col(c0 + width - 1)}{r0 + height}"
            raise ApiError(400, "INVALID_ARGUMENT", f"{where}Range ({written}) exceeds grid limits. Max rows: "
                                                    f"{sheet.row_count}, max columns: {sheet.col_count}")
        if not check_only:
            for i, row in enumerate(values):
                _write_row(sheet.rows, r0 + i, c0, row)
        return {"updatedRange": a1, "updatedRows": height, "updatedColumns": width, "updatedCells": height * width}

    def _append(self, sid: str, book: dict, a1: str, query: dict[str, list[str]], body: dict) -> dict:
        values = body.get("values", [])
        _check_cells(values)
        insert = query.get("insertDataOption", ["OVERWRITE"])[0] == "INSERT_ROWS"
        if self.mode == "racy":  # the row is picked on arrival; the write lands after the latency
            with self.lock:
                sheet, _, c0, _, _, _ = self._range(book, a1)
                seq0, target, arrived = sheet.seq, _table_end(sheet.rows), time.monotonic()
            self._sleep()
            self._wait_for_turn()
            try:
                with self.lock:
                    target, end = self._land(book, book["sheets"].get(sheet.title, sheet), seq0, target, c0, values,
                                             insert)
                    self.max_land_s = max(self.max_land_s, time.monotonic() - arrived)
            finally:
                self._end_turn()
        else:
            self._sleep()
            with self.lock:
                sheet, _, c0, _, _, _ = self._range(book, a1)
                target, end = self._land(book, sheet, sheet.seq, _table_end(sheet.rows), c0, values, insert)
        width = max((len(v) for v in values), default=0)
        first, last = _col(c0), _col(c0 + max(width, 1) - 1)
        updated = f"{sheet.title}!{first}{target + 1}:{last}{target + len(values)}"
        return {"spreadsheetId": sid, "tableRange": f"{sheet.title}!A1:{last}{end}",
                "updates": {"spreadsheetId": sid, "updatedRange": updated, "updatedRows": len(values),
                            "updatedColumns": width, "updatedCells": len(values) * width}}

    def _land(self, book: dict, sheet: Sheet, seq0: int, target: int, c0: int, values: list[list[Any]],
              insert: bool):
        """Write an append aimed at row `target` when the sheet was at `seq0`; returns where it landed."""
        for seq, index, n in sheet.commits:
            if seq > seq0 and index < target:  # rows inserted above move the target down; ties do not
                target += n
            elif seq > seq0 and index == target:
                self.stats["racy_reorders" if insert else "racy_clobbers"] += 1
        width = max((len(v) for v in values), default=0)
        rows = sheet.row_count + len(values) if insert else max(sheet.row_count, target + len(values))
        cols = max(sheet.col_count, c0 + width)  # an append adds the rows, or columns, it needs
        if rows * cols > sheet.row_count * sheet.col_count and \
                _cells(book) - sheet.row_count * sheet.col_count + rows * cols > self.cell_limit:
            raise _too_many_cells(self.cell_limit)
        sheet.row_count, sheet.col_count = rows, cols
        if insert:
            sheet.rows.extend([] for _ in range(target - len(sheet.rows)))
            sheet.rows[target:target] = [[] for _ in values]
        for i, row in enumerate(values):
            _write_row(sheet.rows, target + i, c0, row)
        sheet.seq += 1
        sheet.commits = sheet.commits[-200:] + [(sheet.seq, target, len(values) if insert else 0)]
        return target, _table_end(sheet.rows)

    def _wait_for_turn(self) -> None:
        race = self._race
        if race is None:
            return
        with race["cond"]:
            if race["arrived"] >= race["n"]:
                return
            mine = race["arrived"]
            race["arrived"] += 1
        race["barrier"].wait(timeout=30)
        with race["cond"]:
            race["cond"].wait_for(lambda: race["turn"] == mine, timeout=30)
        threading.current_thread().race_turn = True  # type: ignore[attr-defined]

    def _end_turn(self) -> None:
        race = self._race
        if race is not None and getattr(threading.current_thread(), "race_turn", False):
            threading.current_thread().race_turn = False  # type: ignore[attr-defined]
            with race["cond"]:
                race["turn"] += 1
                race["cond"].notify_all()

    def _range(self, book: dict, a1: str):
        m = re.fullmatch(r"(?:'((?:[^']|'')+)'|([^!']+))(?:!([A-Z]*)(\d*)(?::([A-Z]*)(\d*))?)?", a1)
        title = m and (m.group(1).replace("''", "'") if m.group(1) else m.group(2))
        if not m or title not in book["sheets"]:
            raise ApiError(400, "INVALID_ARGUMENT", f"Unable to parse range: {a1}")
        c0, r0, c1, r1 = (m.group(i) for i in (3, 4, 5, 6))
        single = m.group(3) is not None and m.group(5) is None
        return (book["sheets"][title], int(r0) - 1 if r0 else 0, _col_index(c0) if c0 else 0,
                int(r1) - 1 if r1 else None, _col_index(c1) if c1 else None, single)

    def _token(self, form: dict[str, list[str]]) -> dict:
        try:
            header, payload, signature = form["assertion"][0].split(".")
            claims = json.loads(_b64(payload))
            key = self.accounts[claims["iss"]]
            key.verify(_b64(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
            # google-auth always names Google's token endpoint as the audience, whatever token_uri says.
            assert claims["aud"] == "https://oauth2.googleapis.com/token" and claims["exp"] > time.time() - 60
        except Exception:
            raise ApiError(400, "invalid_grant", "Invalid JWT Signature.") from None
        if claims["iss"] in self.revoked:
            raise ApiError(400, "invalid_grant", "Invalid JWT Signature.")
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        with self.lock:
            self.tokens[token] = claims["iss"]
            self.stats["tokens"] += 1
        return {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Google's front end
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def log_message(self, *args) -> None:
        pass

    def _serve(self) -> None:
        fake: FakeSheets = self.server.fake  # type: ignore[attr-defined]
        with fake.lock:
            fake.busy += 1
        try:
            self._answer(fake)
        finally:
            with fake.lock:
                fake.busy -= 1

    def _answer(self, fake: FakeSheets) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        result = fake.handle(self.command, self.path, body, self.headers)
        if result is HANG or result is DROP:  # applied, but the answer never comes
            time.sleep(fake.hang_s if result is HANG else 0)
            self.close_connection = True
            return
        status, payload, headers = result
        if self.path.startswith("/token") and status != 200:  # OAuth errors have their own shape
            payload = {"error": payload["error"]["status"], "error_description": payload["error"]["message"]}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json; charset=UTF-8", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _serve


@functools.cache
def _private_key() -> rsa.RSAPrivateKey:
    """One throwaway RSA key per process, shared by every fake account (generating one takes a while)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _col_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + ord(ch) - 64
    return n - 1


def _col(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(65 + rem) + letters
    return letters


def _formatted(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return str(value)


def _table_end(rows: list[list[Any]]) -> int:
    for i in range(len(rows) - 1, -1, -1):
        if any(v not in ("", None) for v in rows[i]):
            return i + 1
    return 0


def _write_row(rows: list[list[Any]], r: int, c0: int, values: list[Any]) -> None:
    """Null values are skipped: the cell keeps what it held."""
    rows.extend([] for _ in range(r + 1 - len(rows)))
    row = rows[r]
    row.extend("" for _ in range(c0 + len(values) - len(row)))
    for i, v in enumerate(values):
        if v is not None:
            row[c0 + i] = v


def _cells(book: dict) -> int:
    return sum(s.row_count * s.col_count for s in book["sheets"].values())


def _check_cells(values: list[list[Any]]) -> None:
    if any(isinstance(v, str) and len(v) > CELL_LIMIT for row in values for v in row):
        raise ApiError(400, "INVALID_ARGUMENT", f"Your input contains more than the maximum of {CELL_LIMIT} "
                                                "characters in a single cell.")
