"""Google credentials for the Sheets store, found in a fixed order, and the one-line errors when Google refuses them.

Order: a service-account JSON in SWEEPER_GSHEETS_CREDENTIALS (the JSON text or a path to it) or in the file
GOOGLE_APPLICATION_CREDENTIALS names; on Colab, the notebook's login (`google.colab.auth.authenticate_user()`,
then `google.auth.default()`); a Colab or Kaggle secret named SWEEPER_GSHEETS_CREDENTIALS holding the JSON.
No message ever contains the private key or a token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.errors import SweeperError, UserError
from sweeper.platforms import platform_name, platform_secret

SCOPES = ["https://www.googleapis.com/auth/spreadsheets"]
CREDENTIALS_ENV = "SWEEPER_GSHEETS_CREDENTIALS"
SECRET_NAME = CREDENTIALS_ENV  # the same name for the Colab and Kaggle secret
HOW_TO = (f"set {CREDENTIALS_ENV} to a service-account JSON (the text or its path), or on Colab run "
          "google.colab.auth.authenticate_user() first, or add a Colab/Kaggle secret named "
          f"{SECRET_NAME} holding the JSON")


@dataclass(frozen=True)
class GoogleCredentials:
    credentials: Any
    source: str
    """Where they came from, for messages: 'environment variable ...', 'Kaggle secret ...'."""
    email: str | None = None
    """The service account's client_email; None for a person's login."""

    @property
    def who(self) -> str:
        return self.email or "the Google account you signed in with"

    def share_hint(self) -> str:
        if self.email:
            return f"share the sheet with {self.email} as Editor (Share button in Google Sheets)"
        return "share the sheet with the Google account you signed in with, as Editor"


def find_credentials() -> GoogleCredentials:
    """The first credentials found in the documented order; UserError naming every place looked at."""
    value = os.environ.get(CREDENTIALS_ENV, "").strip()
    if value:
        return service_account(value, f"environment variable {CREDENTIALS_ENV}")
    adc = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip()
    if adc and not os.path.isfile(Path(adc).expanduser()):  # a mistyped path is said, not skipped for the next place
        raise UserError(f"GOOGLE_APPLICATION_CREDENTIALS names {adc}, and there is no file there: fix the path or "
                        "unset it")
    if adc and _is_service_account_file(adc):
        return service_account(adc, "GOOGLE_APPLICATION_CREDENTIALS")
    login = _colab_login()
    if login is not None:
        return login
    secret = platform_secret(SECRET_NAME)
    if secret:
        return service_account(secret, f"{platform_name().capitalize()} secret {SECRET_NAME}")
    raise UserError(f"no Google credentials for the gsheets store: {HOW_TO}")


def service_account(text_or_path: str, source: str) -> GoogleCredentials:
    """Service-account credentials from JSON text or a path to it; UserError that never echoes the key."""
    from google.oauth2 import service_account as sa

    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
        path = Path(text_or_path).expanduser()
        # Shown only when it looks like a path: a pasted key, token or base64 blob never reaches a message.
        looks_like_path = ("/" in text_or_path or text_or_path.endswith(".json")) and len(text_or_path) < 300
        shown = str(path) if looks_like_path and "PRIVATE" not in text_or_path else "(value not shown)"
        if not os.path.isfile(path):  # unlike Path.is_file, never raises (a value too long for a file name)
            raise UserError(f"{source} is neither service-account JSON nor an existing file: {shown}")
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"cannot read the service-account file {shown} from {source}: {e.strerror}") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:  # the message holds a position, never the text
        raise UserError(f"the service-account JSON from {source} does not parse ({e.msg} at line {e.lineno})") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise UserError(f"the JSON from {source} is not a service-account key (its \"type\" must be "
                        "\"service_account\"; download one from Google Cloud > IAM > Service accounts > Keys)")
    missing = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
    if missing:
        raise UserError(f"the service-account JSON from {source} lacks {', '.join(missing)}; download a fresh key")
    try:
        credentials = sa.Credentials.from_service_account_info(info, scopes=SCOPES)
    except (ValueError, TypeError, IndexError):  # cryptography cannot load the key; say so without the key
        raise UserError(f"the private key in the service-account JSON from {source} ({info['client_email']}) "
                        "does not load; download a fresh key") from None
    return GoogleCredentials(credentials, source, info["client_email"])


def refused(creds: GoogleCredentials, error: Exception | str) -> UserError:
    """Google refused the credentials themselves (token refresh failed, or HTTP 401)."""
    reason = _oauth_reason(error)
    fix = ("the key may have been revoked or its service account deleted: create a new key and update "
           f"{creds.source}" if creds.email else "sign in again (google.colab.auth.authenticate_user())")
    return UserError(f"Google refused the credentials of {creds.who} from {creds.source} ({reason}): {fix}")


def _oauth_reason(error: Exception | str) -> str:
    # RefreshError args: (message, response_body); keep Google's error code and description only.
    args = getattr(error, "args", ())
    body = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
    if body.get("error"):
        return ": ".join(str(x) for x in (body["error"], body.get("error_description")) if x)
    text = str(args[0] if args else error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def _is_service_account_file(path: str) -> bool:
    try:
        return json.loads(Path(path).expanduser().read_text()).get("type") == "service_account"
    except (OSError, ValueError, AttributeError):
        return False


def _colab_login() -> GoogleCredentials | None:
    if platform_name() != "colab":
        return None
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError:
        return None
    try:
        credentials, _ = google.auth.default(scopes=SCOPES)
    except DefaultCredentialsError:
        return None
    email = getattr(credentials, "service_account_email", None)
    email = email if email and "@" in email else None  # Colab's own login reports "default"
    return GoogleCredentials(credentials, "the Colab login", email)


def api_error_message(creds: GoogleCredentials, spreadsheet_id: str, status: int, message: str) -> SweeperError:
    """What to do about a refused Sheets request, in one line."""
    lowered = message.lower()
    if status == 404:
        return UserError(f"spreadsheet {spreadsheet_id!r} not found: check the ID in gsheets://ID "
                         "(the part of the sheet's address between /d/ and /edit)")
    if status == 401:
        return refused(creds, f"HTTP 401: {message}")
    if status == 403 and ("has not been used" in lowered or "is disabled" in lowered or "service_disabled" in lowered):
        return UserError("the Google Sheets API is not enabled for the service account's Cloud project: enable it at "
                         "https://console.cloud.google.com/apis/library/sheets.googleapis.com, then retry")
    if status == 403:
        return UserError(f"{creds.who} may not open spreadsheet {spreadsheet_id!r}: {creds.share_hint()}")
    return SweeperError(f"Google Sheets refused a request to spreadsheet {spreadsheet_id!r} (HTTP {status}): "
                        f"{message.splitlines()[0] if message else 'no message'}")
