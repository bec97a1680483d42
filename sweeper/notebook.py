"""`sweeper notebook`: a runner notebook for Colab, Kaggle or this machine, from templates/<platform>.ipynb
(installed as the package sweeper.templates).

Rendering fills in the papermill-style `parameters` cell and the `sweeper-code` cell; the other cells are the
template's. By default a Colab or Kaggle notebook carries this install's own code as a wheel (sweeper/wheel.py) and
installs it from there, so the notebook runs exactly the sweeper that rendered it, published or not. No secret is
ever written into a notebook: a store URL holding a password is left out, and the notebook reads it from the
secret SWEEPER_STORE instead.
"""

from __future__ import annotations

import base64
import lzma
import re
from importlib.resources import files
from pathlib import Path

import nbformat

from sweeper import __version__, wheel
from sweeper.errors import SweeperError, UserError, first_line
from sweeper.platforms import STORE_SECRET
from sweeper.storage import FILE_STORES, redact

PLATFORMS = ("colab", "kaggle", "local")
GSHEETS_SECRET = "SWEEPER_GSHEETS_CREDENTIALS"  # the name sweeper.storage.gsheets.auth reads


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
           install: str | None = None, per_gpu: bool = True, allow_cpu: bool = False) -> nbformat.NotebookNode:
    """The platform's template with its parameters filled in. install None: this sweeper's own code, carried in the
    notebook (Colab, Kaggle) or already installed (local); otherwise the pip requirement the install cell runs."""
    if platform not in PLATFORMS:
        raise UserError(f"unknown platform {platform!r}; one of {', '.join(PLATFORMS)}")
    if not re.match(r"^[a-z][a-z0-9+.-]*://", store or ""):
        raise UserError(f"malformed store URL {shown(store)!r}; `sweeper stores` lists the kinds")
    check_reachable(platform, store)
    shared, comments = _shared_parameters(platform, store, study, install, allow_cpu)
    install = shared["install"]
    if install and re.search(r"://[^/@\s]+@", install):
        raise UserError("the install requirement holds a credential (https://user@host or user:token@host); "
                        "give one that needs none, e.g. a public git URL or a package version")
    wheel_name, wheel_bytes = wheel.build(stored=True) if install is None else (None, None)
    nb = nbformat.reads(files("sweeper.templates").joinpath(f"{platform}.ipynb").read_text(), as_version=4)
    fill(nb, "parameters", {**shared, "account": account, "max_trials": max_trials, "checkpoint_root": checkpoint_root,
                            "deadline_hours": deadline_hours, "per_gpu": per_gpu}, comments)
    carried = base64.b64encode(lzma.compress(wheel_bytes, preset=9 | lzma.PRESET_EXTREME)).decode() if wheel_bytes else None
    fill(nb, "sweeper-code", {"rendered_by": __version__, "wheel_name": wheel_name, "wheel_xz_base64": carried})
    nbformat.validate(nb)
    return nb


CARRIED_CELLS = ("sweeper-code", "install", "check")  # the runner notebook's: install and check this sweeper
FULL_RUN_PARAMETERS = ("out", "train_tokens", "epochs", "checkpoint_every", "push_to", "prompts")


def render_full_run(platform: str, store: str, study: str | None = None, *, install: str | None = None,
                    allow_cpu: bool = False, **parameters) -> nbformat.NotebookNode:
    """The full-run notebook (templates/full_run.ipynb): the platform's runner notebook lends its checks, metadata
    and install cells (so it carries the same code), and Colab's last cell, which flushes Drive; `parameters` fill
    the parameters cell (FULL_RUN_PARAMETERS). The Hub token is read from the secret HF_TOKEN, never written here."""
    runner = render(platform, store, study, install=install, allow_cpu=allow_cpu)
    nb = nbformat.reads(files("sweeper.templates").joinpath("full_run.ipynb").read_text(), as_version=4)
    nb.metadata = runner.metadata
    lent = {c.id: c for c in runner.cells}
    nb.cells[2:2] = [lent[name] for name in CARRIED_CELLS]  # after the intro and the parameters
    nb.cells += [lent["flush"]] if "flush" in lent else []
    shared, comments = _shared_parameters(platform, store, study, install, allow_cpu)
    fill(nb, "parameters", {name: parameters.get(name) for name in FULL_RUN_PARAMETERS} | shared, comments)
    nbformat.validate(nb)
    return nb


def _shared_parameters(platform: str, store: str, study: str | None, install: str | None,
                       allow_cpu: bool) -> tuple[dict, dict[str, str]]:
    """The parameters the runner and the full-run notebooks both set, and their comments: a store URL that holds a
    password is left out (the notebook reads it from the secret STORE_SECRET); install None on local is "" (this
    sweeper is already installed there)."""
    secret = store_has_secret(store)
    values = {"store": None if secret else store, "study": study,
              "install": "" if install is None and platform == "local" else install,
              "secrets": secrets_needed(store), "allow_cpu": allow_cpu}
    return values, {"store": f"  # {shown(store)}: read from the secret {STORE_SECRET}, never written here"} if secret else {}


def check_reachable(platform: str, store: str) -> None:
    """A Colab or Kaggle machine cannot open a file on this one, nor Kaggle a Drive folder."""
    if platform == "local":
        return
    name = platform.capitalize()
    if store.startswith(FILE_STORES):
        raise UserError(f"a {name} notebook cannot reach {shown(store)}: that store is a file on this machine; use "
                        "gsheets:// (README: A Google Sheet as the store)" + (" or drive://" if platform == "colab" else "")
                        + ", or a database server")
    if store.startswith("drive://") and platform == "kaggle":
        raise UserError("Kaggle cannot mount Google Drive, so it cannot use a drive:// store; use gsheets:// "
                        "(README: A Google Sheet as the store)")
    if store.startswith("drive://") and not store.startswith("drive:///content/drive/"):
        raise UserError(f"a Colab notebook sees Google Drive under /content/drive: give the folder as "
                        f"drive:///content/drive/MyDrive/..., not {shown(store)}")


def study_warning(store: str, study: str | None) -> str | None:
    """A warning when the store, read from here, holds no such study: the notebook would stop at its first trial.
    Not for drive:// (Colab's folder, not this machine's); a store this machine cannot read is said, not refused."""
    if study is None or store.startswith("drive://"):
        return None
    import optuna

    from sweeper.storage import open_storage

    try:
        names = optuna.get_all_study_names(open_storage(store))
    except Exception as e:  # noqa: BLE001  only a warning: the notebook's machine may well reach what this one cannot
        return f"warning: could not read {shown(store)} from here to check study {study!r} ({first_line(e)})"
    if study not in names:
        held = ", ".join(repr(n) for n in names) or "no study"
        return f"warning: {shown(store)} holds {held}, not study {study!r}: run sweeper init first"
    return None


def fill(nb: nbformat.NotebookNode, cell_id: str, values: dict, comments: dict[str, str] | None = None) -> None:
    """Set `name = value` lines of one cell, keeping their comments (or replacing them from `comments`)."""
    cell = next(c for c in nb.cells if c.get("id") == cell_id)
    lines = []
    for line in cell.source.splitlines():
        match = re.match(r"^(\w+) = .*?(  # .*)?$", line)
        if match and match.group(1) in values:
            name = match.group(1)
            line = f"{name} = {values[name]!r}{(comments or {}).get(name, match.group(2) or '')}"
        lines.append(line)
    cell.source = "\n".join(lines)


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    try:
        nbformat.write(nb, str(path))
    except OSError as e:
        raise SweeperError(f"cannot write {path}: {e.strerror or e}") from None
