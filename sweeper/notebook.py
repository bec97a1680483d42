"""`sweeper notebook`: a runner notebook for Colab, Kaggle or this machine, from templates/<platform>.ipynb.

Rendering fills in the papermill-style `parameters` cell only; the other cells are the template's. No secret is
ever written into a notebook: a store URL holding a password is left out, and the notebook reads it from the
secret SWEEPER_STORE instead.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import nbformat

from sweeper import __version__
from sweeper.errors import SweeperError, UserError
from sweeper.storage import redact

PLATFORMS = ("colab", "kaggle", "local")
STORE_SECRET = "SWEEPER_STORE"
GSHEETS_SECRET = "SWEEPER_GSHEETS_CREDENTIALS"  # the name sweeper.storage.google_auth reads
DEFAULT_INSTALL = f"sweeper[runner]=={__version__}"


SECRET_QUERY = re.compile(r"([?&](?:password|passwd|pwd|token|secret)=)[^&]*", re.I)


def shown(store: str) -> str:
    """The store URL with any password, in its user info (user:pw@host) or its query (?password=...), masked."""
    return SECRET_QUERY.sub(r"\1***", redact(store))


def store_has_secret(store: str) -> bool:
    return shown(store) != store


def secrets_needed(store: str) -> list[str]:
    """The secrets a notebook for this store reads: the store URL itself when it holds a password, Google's key."""
    return ([STORE_SECRET] if store_has_secret(store) else []) + ([GSHEETS_SECRET] if store.startswith("gsheets://") else [])


def render(platform: str, store: str, study: str | None = None, *, account: str | None = None,
           max_trials: int | None = None, checkpoint_root: str | None = None, deadline_hours: float | None = None,
           install: str | None = None, per_gpu: bool = True) -> nbformat.NotebookNode:
    """The platform's template with its parameters cell filled in; install None: the pinned package, none locally."""
    if platform not in PLATFORMS:
        raise UserError(f"unknown platform {platform!r}; one of {', '.join(PLATFORMS)}")
    if not re.match(r"^[a-z][a-z0-9+.-]*://", store or ""):
        raise UserError(f"malformed store URL {shown(store)!r}; `sweeper stores` lists the kinds")
    if platform == "kaggle" and store.startswith("drive://"):
        raise UserError("Kaggle cannot mount Google Drive, so it cannot use a drive:// store; use gsheets:// "
                        "(README: A Google Sheet as the store)")
    if install is None:
        install = "" if platform == "local" else DEFAULT_INSTALL
    if re.search(r"://[^/@\s]+@", install):
        raise UserError("the install requirement holds a credential (https://user@host or user:token@host); "
                        "give one that needs none, e.g. a public git URL or a package version")
    nb = nbformat.reads(files("sweeper").joinpath("templates", f"{platform}.ipynb").read_text(), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    secret = store_has_secret(store)
    values = {"store": None if secret else store, "study": study, "account": account, "max_trials": max_trials,
              "checkpoint_root": checkpoint_root, "deadline_hours": deadline_hours, "install": install,
              "secrets": secrets_needed(store), "per_gpu": per_gpu}
    lines = []
    for line in cell.source.splitlines():
        match = re.match(r"^(\w+) = .*?(  # .*)?$", line)
        if match and match.group(1) in values:
            name, comment = match.group(1), match.group(2) or ""
            if name == "store" and secret:
                comment = f"  # {shown(store)}: read from the secret {STORE_SECRET}, never written here"
            line = f"{name} = {values[name]!r}{comment}"
        lines.append(line)
    cell.source = "\n".join(lines)
    nbformat.validate(nb)
    return nb


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    try:
        nbformat.write(nb, str(path))
    except OSError as e:
        raise SweeperError(f"cannot write {path}: {e.strerror or e}") from None
