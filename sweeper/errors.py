"""The two kinds of failure a user sees: bad input (exit 2) and runtime failure (exit 1)."""


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
