"""The two kinds of failure a user sees, bad input (exit 2) and runtime failure (exit 1); numbers from the
environment, read the one way."""

from __future__ import annotations

import math
import os
from typing import Any


class SweeperError(Exception):
    """Something went wrong while doing what was asked (exit 1)."""

    exit_code = 1


class UserError(SweeperError):
    """What was asked is malformed: a bad sweep file, URL, flag or study name (exit 2)."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """An exception's message, first line only (library messages run on); its type's name if it has none."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


class StoreChanged(SweeperError):
    """What this process already read from the store changed under it (a hand edit, an append that landed
    late): its view of the study is no longer valid; reload the study."""


def env_number(name: str, default: Any = None, *, integer: bool = False, positive: bool = False) -> Any:
    """A SWEEPER_* number from the environment, or `default` when unset or empty; UserError in one message.

    Every number a user may set by environment goes through here, so each says the same thing when wrong:
    "SWEEPER_DRIVE_SYNC_S must be a number of seconds (got '5s')". The unit comes from the name (`_S`: seconds,
    `_HOURS`: hours). Never negative; `positive`: above 0; `integer`: a whole number (`3` or `3.0`).
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    unit = " of seconds" if name.endswith("_S") else " of hours" if name.endswith("_HOURS") else ""
    kind = "whole number" if integer else "number"
    wanted = f"{name} must be {'a positive' if positive else 'a'} {kind}{unit} (got {raw!r})"
    try:
        value = float(raw)
    except ValueError:
        raise UserError(wanted) from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or (integer and not value.is_integer()):
        raise UserError(wanted)
    return int(value) if integer else value
