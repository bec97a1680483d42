"""Stand-in for google.colab.auth: authenticate_user raises what colabtools' google/colab/auth.py raises when the
login fails (errors.AuthorizationError('Failed to fetch user credentials')); SWEEPER_FAKE_COLAB_LOGIN says how the
person answers the popup."""

import os

from google.colab import errors as _errors

__all__ = ["authenticate_user"]


def authenticate_user(clear_output=True):
    if os.environ.get("SWEEPER_FAKE_COLAB_LOGIN", "declined") != "ok":
        raise _errors.AuthorizationError("Failed to fetch user credentials")
