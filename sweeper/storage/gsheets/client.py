"""gspread's HTTP client with what production needs: our own timeouts, bounded retries, request counts.

gspread's BackOffHTTPClient retries forever and ignores network errors, and requests has no default
timeout (docs/design.md). Here every request has a timeout; 408, 429, 5xx and network errors are retried a bounded
number of times with capped exponential backoff and jitter, honouring Retry-After; a write that may have
been applied before it failed (an append that timed out or got a 408 or 5xx) is never retried blindly, the
caller decides (MayHaveLanded). A body that cannot be sent as JSON (a NaN, an object) is a programming error,
raised at once (UnsendableRequest): requests would call it a network error, and it would be retried.
The round trips of answered requests are kept (`rtts`): journal.py waits for racing appends by them.
"""

from __future__ import annotations

import json as _json
import os
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

import requests
from google.auth.exceptions import RefreshError, TransportError
from google.auth.transport.requests import AuthorizedSession
from gspread.exceptions import APIError  # noqa: F401  (re-exported for journal.py, which imports this lazily)
from gspread.http_client import HTTPClient

from sweeper.errors import SweeperError, UserError, env_number
from sweeper.storage.gsheets.auth import GoogleCredentials, api_error_message, refused

GOOGLE_ROOT = "https://sheets.googleapis.com"
ENDPOINT_ENV = "SWEEPER_GSHEETS_ENDPOINT"


@dataclass
class SheetSettings:
    """Timing knobs, each overridable by an environment variable SWEEPER_GSHEETS_<NAME> (seconds unless noted)."""

    endpoint: str = ""
    """API root used instead of https://sheets.googleapis.com (a local test server); empty = Google."""
    timeout_s: float = 30.0
    """Per request (connect and read)."""
    attempts: int = 7
    """Tries per request on 429/5xx/network errors; 1+2+4+...+32 s of backoff spans a quota minute."""
    backoff_s: float = 1.0
    backoff_cap_s: float = 32.0
    sync_s: float = 10.0
    """A reader serves the journal from its cache for this long before asking the sheet again."""
    settle_s: float = 1.0
    """How long a racing append may take to land, at least; rows are replayed only once older than the settle
    time, which grows with the round trips this worker measures (see journal.py). 0: trust every append."""
    settle_max_s: float = 10.0
    """The most the settle time grows to, however slow Google is."""
    views_s: float = 60.0
    """A worker rewrites the `trials` view at most this often."""
    heartbeat_s: float = 300.0
    """A worker refreshes its `workers` row at least this often, when nothing else changed; a running trial's
    lease beats no more often than this either (each beat is a journal row, and the quota is the scarce thing)."""
    cell_limit: int = 10_000_000
    """Google's cells per spreadsheet, all worksheets together (rows x columns of each grid); lower only in tests."""

    @classmethod
    def from_env(cls) -> SheetSettings:
        settings = cls()
        for f in fields(cls):
            raw = os.environ.get(f"SWEEPER_GSHEETS_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            if f.name == "endpoint":
                settings.endpoint = check_endpoint(raw)
                continue
            setattr(settings, f.name, env_number(f"SWEEPER_GSHEETS_{f.name.upper()}", getattr(settings, f.name),
                                                 integer=f.type in ("int", int), positive=f.name == "attempts"))
        return settings


def check_endpoint(url: str) -> str:
    """An endpoint override must be https, or http to this machine: the bearer token travels to it."""
    parts = urlsplit(url.rstrip("/"))
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme not in ("http", "https") or not parts.hostname or (parts.scheme == "http" and not local):
        raise UserError(f"{ENDPOINT_ENV} must be an https:// URL or http:// to localhost (got {url!r})")
    return url.rstrip("/")


class MayHaveLanded(Exception):
    """A write failed in a way that Google may still have applied it (timeout, dropped connection, 5xx)."""


class SheetsUnavailable(SweeperError):
    """Retries ran out: quota exhausted for too long, or Google unreachable."""


class UnsendableRequest(ValueError):
    """A request body that is not JSON (NaN, infinity, an object): a bug in the caller, never retried."""


RTT_WINDOW = 64  # round trips kept
RTT_BODY_MAX = 64 * 1024  # a bigger answer's round trip is mostly its transfer, which says nothing of landing times


class SheetsClient(HTTPClient):
    """One spreadsheet's HTTP client: gspread's request methods over our bounded, timed, counted request()."""

    def __init__(self, creds: GoogleCredentials, spreadsheet_id: str, settings: SheetSettings,
                 counts: Counter[str] | None = None):
        if settings.endpoint and hasattr(creds.credentials, "_is_regional_access_boundary_lookup_required"):
            # google-auth looks up the account's "regional access boundary" at Google in the background after
            # each token refresh; with the API served elsewhere that lookup only leaks the token: skip it.
            creds.credentials._is_regional_access_boundary_lookup_required = lambda: False
        session = AuthorizedSession(creds.credentials, refresh_timeout=settings.timeout_s)
        super().__init__(auth=creds.credentials, session=session)
        self.creds, self.spreadsheet_id, self.settings = creds, spreadsheet_id, settings
        self.timeout = (min(10.0, settings.timeout_s), settings.timeout_s)
        self.counts: Counter[str] = Counter() if counts is None else counts
        """reads and writes (every attempt: each counts against the quota), retries, http_408, http_429, http_5xx,
        network."""
        self.rtts: deque[float] = deque(maxlen=RTT_WINDOW)
        """Seconds from sending to the answer, of the last requests answered with a small body (no token refresh)."""

    def request(self, method, endpoint, params=None, data=None, json=None, files=None, headers=None):
        url = self.settings.endpoint + endpoint[len(GOOGLE_ROOT):] if self.settings.endpoint and \
            endpoint.startswith(GOOGLE_ROOT) else endpoint
        kind = "reads" if method.lower() == "get" else "writes"
        not_idempotent = url.endswith(":append")  # a repeated append adds a second copy
        if json is not None:  # serialised here: requests would raise InvalidJSONError, a RequestException
            try:
                data = _json.dumps(json, allow_nan=False, separators=(",", ":"))
            except (TypeError, ValueError) as e:
                raise UnsendableRequest(f"a {method.upper()} to the Sheets API has a body that is not JSON: {e}") \
                    from None
            headers, json = {**(headers or {}), "Content-Type": "application/json"}, None
        last, delay = "", 0.0
        for attempt in range(self.settings.attempts):
            if attempt:
                self.counts["retries"] += 1
                time.sleep(delay)
            self.counts[kind] += 1
            token, sent = getattr(self.creds.credentials, "token", None), time.monotonic()
            try:
                response = self.session.request(method, url, params=params, data=data, json=json, files=files,
                                                headers=headers, timeout=self.timeout)
            except RefreshError as e:
                if not getattr(e, "retryable", False):  # refused, not merely unreachable
                    raise refused(self.creds, e) from None
                last, delay = "token endpoint unavailable", self._backoff(attempt)
                continue
            except (requests.RequestException, TransportError) as e:
                self.counts["network"] += 1
                last = f"{type(e).__name__}"
                if not_idempotent:
                    raise MayHaveLanded(last) from None
                delay = self._backoff(attempt)
                continue
            if len(response.content) <= RTT_BODY_MAX and getattr(self.creds.credentials, "token", None) == token:
                self.rtts.append(time.monotonic() - sent)
            if response.ok:
                return response
            status = response.status_code
            if status in (408, 429) or status >= 500:  # 408: Google's front end gave up waiting (HTML, not JSON)
                self.counts["http_429" if status == 429 else "http_408" if status == 408 else "http_5xx"] += 1
                last = f"HTTP {status}"
                if status != 429 and not_idempotent:
                    raise MayHaveLanded(last)
                delay = self._retry_after(response) or self._backoff(attempt)
                continue
            if status in (401, 403, 404):
                message = APIError(response).error.get("message", "")
                raise api_error_message(self.creds, self.spreadsheet_id, status, message)
            raise APIError(response)
        hint = " (per-minute quota: fewer workers per account, or one account per worker)" if last == "HTTP 429" else ""
        raise SheetsUnavailable(f"Google Sheets failed after {self.settings.attempts} attempts "
                                f"(last: {last}){hint}; try again later")

    def _backoff(self, attempt: int) -> float:
        cap = min(self.settings.backoff_cap_s, self.settings.backoff_s * 2 ** attempt)
        return cap * (0.5 + random.random() / 2)

    def _retry_after(self, response: requests.Response) -> float | None:
        try:
            return min(float(response.headers["Retry-After"]), self.settings.backoff_cap_s)
        except (KeyError, ValueError):
            return None
