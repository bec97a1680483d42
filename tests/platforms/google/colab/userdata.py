"""Stand-in for google.colab.userdata: colabtools' google/colab/userdata.py, the frontend's answer read from
SWEEPER_FAKE_COLAB_SECRETS instead of asked of the browser."""

import json
import os

from google.colab import errors


class NotebookAccessError(Exception):
    """Exception thrown when the current notebook doesn't have access to the requested secret."""

    def __init__(self, key):
        super().__init__(f"Notebook does not have access to secret {key}")


class SecretNotFoundError(errors.Error):
    """Exception thrown when the requested secret is not found."""

    def __init__(self, key):
        super().__init__(f"Secret {key} does not exist.")


def get(key):
    panel = json.loads(os.environ.get("SWEEPER_FAKE_COLAB_SECRETS", "{}"))
    resp = {"exists": key in panel, "access": panel.get(key, {}).get("access", False),
            "payload": panel.get(key, {}).get("value", "")}
    if not resp.get("exists", False):
        raise SecretNotFoundError(key)
    if not resp.get("access", False):
        raise NotebookAccessError(key)
    return resp.get("payload", "")
