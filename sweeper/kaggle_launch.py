"""`sweeper launch kaggle`: push the Kaggle runner notebook as a new version of your own private kernel, and run it.

Through the official `kaggle` client (KaggleApi: kernels_push, kernels_status) with your own credentials, found
where the client looks: KAGGLE_API_TOKEN, KAGGLE_USERNAME + KAGGLE_KEY, or kaggle.json in its config folder.
Every failure is one line; no credential is ever printed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeper import notebook
from sweeper.errors import SweeperError, UserError, env_number, first_line

# machine_shape values the Kaggle API takes (kagglesdk's ApiSaveKernelRequest docs; kaggle-cli docs/kernels.md):
# NvidiaTeslaT4 is the editor's "GPU T4 x2" (there is no single-T4 shape). NvidiaTeslaP100 is retired (the client says so).
MACHINE_SHAPES = {"t4x2": "NvidiaTeslaT4", "p100": "NvidiaTeslaP100"}
NOTEBOOK_ACCELERATORS = {"t4x2": "nvidiaTeslaT4", "p100": "nvidiaTeslaP100"}
MAX_SESSION_HOURS = 9.0  # a Kaggle GPU session's limit, as its 2026 quota message gives it
CREDENTIALS_HELP = ("set KAGGLE_API_TOKEN to a token from https://www.kaggle.com/settings/api (or KAGGLE_USERNAME "
                    "and KAGGLE_KEY, or put kaggle.json in ~/.kaggle)")


def _timeout_s() -> float:
    return env_number("SWEEPER_KAGGLE_TIMEOUT_S", 60.0, positive=True)


def kernel_slug(study: str) -> tuple[str, str]:
    """(title, slug) with slug == slugify(title), as Kaggle derives it."""
    from slugify import slugify  # python-slugify, a dependency of kaggle

    title = f"sweeper {study}"
    return title, slugify(title)


def kernel_metadata(username: str, study: str, code_file: str, gpu: str = "t4x2", private: bool = True) -> dict[str, Any]:
    """kernel-metadata.json: a GPU notebook with internet on (to pip install), private unless asked."""
    title, slug = kernel_slug(study)
    return {"id": f"{username}/{slug}", "title": title, "code_file": code_file, "language": "python",
            "kernel_type": "notebook", "is_private": private, "enable_gpu": True, "enable_tpu": False,
            "enable_internet": True, "machine_shape": MACHINE_SHAPES[gpu], "dataset_sources": [],
            "competition_sources": [], "kernel_sources": [], "model_sources": []}


def _call(what: str, fn: Callable[[], Any], secrets: Callable[[], list[str]] = list) -> Any:
    """fn() with a time limit (the client sets none), its failures as one line with every secret masked.

    The client prints help and version warnings to stdout: that is kept off ours.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                result["value"] = fn()
        except BaseException as e:  # SystemExit too: the client exits when it finds no credentials
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(_timeout_s())
    if thread.is_alive():
        raise SweeperError(f"Kaggle did not answer within {_timeout_s():.0f} s while {what}; try again later")
    if "error" not in result:
        return result["value"]
    error = result["error"]
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None:
        raise _http_error(what, error.response, secrets()) from None
    if isinstance(error, requests.RequestException):
        raise SweeperError(f"cannot reach Kaggle while {what} ({type(error).__name__}); check the network") from None
    if isinstance(error, (SweeperError, SystemExit)):
        raise error
    raise SweeperError(f"the kaggle client failed while {what}: {_mask(_first_line(error), secrets())}") from None


def _http_error(what: str, response, secrets: list[str]) -> SweeperError:
    status = response.status_code
    try:
        body = response.json()
        message = str(body.get("message", "")) if isinstance(body, dict) else str(body)
    except ValueError:
        message = response.text
    detail = f"HTTP {status}" + (f": {_mask(message.splitlines()[0][:200], secrets)}" if message.strip() else "")
    if status == 401:
        return UserError(f"Kaggle refused the credentials ({detail}): {CREDENTIALS_HELP}")
    if status == 403:
        return UserError(f"Kaggle refused {what} ({detail}): check that the credentials are yours; "
                         "a GPU and internet need a phone-verified Kaggle account")
    if status == 404:
        return UserError(f"Kaggle found nothing while {what} ({detail})")
    if status == 429:
        wait = response.headers.get("Retry-After")
        return SweeperError(f"Kaggle is limiting requests ({detail}); try again in {wait or 'a minute or so'}"
                            f"{' s' if wait and wait.isdigit() else ''}")
    return SweeperError(f"Kaggle failed while {what} ({detail}); try again later")


def _first_line(error: BaseException) -> str:
    return first_line(error)[:300]


def _mask(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _secrets(api=None) -> list[str]:
    values = [os.environ.get("KAGGLE_API_TOKEN", ""), os.environ.get("KAGGLE_KEY", "")]
    if api is not None:
        values += [str(api.config_values.get(k, "")) for k in ("key", "token")]
    return [v for v in values if len(v) >= 4]


def _api():
    """An authenticated KaggleApi and the username it acts as; UserError when no credentials work."""
    if importlib.util.find_spec("kaggle") is None:
        raise UserError("the kaggle client is not installed: pip install 'sweeper-qlora[kaggle]'")
    holder: dict[str, Any] = {}

    def sign_in():
        import kaggle  # signs its `api` in, and swallows any failure

        holder["api"] = kaggle.api
        if not kaggle.api.config_values.get("username"):
            kaggle.api.authenticate()  # again, for the failure
        return kaggle.api

    try:
        api = _call("signing in", sign_in, lambda: _secrets(holder.get("api")))
    except SystemExit:  # the client found no credentials it could use
        from kagglesdk import get_access_token_from_env

        token, source = get_access_token_from_env()
        if token:
            raise UserError(f"Kaggle did not accept the access token from {source} (expired or revoked?): "
                            "create a new one at https://www.kaggle.com/settings/api") from None
        raise UserError(f"no Kaggle credentials: {CREDENTIALS_HELP}") from None
    username = api.config_values.get("username")
    if not username:
        raise UserError(f"the Kaggle credentials name no user: {CREDENTIALS_HELP}")
    return api, username


def launch(store: str, study: str, *, gpu: str = "t4x2", timeout_hours: float | None = None, account: str | None = None,
           install: str | None = None, private: bool = True, log: Callable[[str], None] = print) -> str:
    """Push the rendered Kaggle notebook as a new version of <username>/sweeper-<study> and start it; its URL."""
    notebook.check_reachable("kaggle", store)  # before asking Kaggle anything
    if timeout_hours is not None and not 0 < timeout_hours <= MAX_SESSION_HOURS:
        raise UserError(f"--timeout must be more than 0 and at most {MAX_SESSION_HOURS:g} hours (Kaggle's session limit)")
    api, username = _api()
    nb = notebook.render("kaggle", store, study, account=account or f"kaggle:{username}", install=install,
                         deadline_hours=timeout_hours)
    nb.metadata["kaggle"]["accelerator"] = NOTEBOOK_ACCELERATORS[gpu]
    title, slug = kernel_slug(study)
    with tempfile.TemporaryDirectory() as folder:
        notebook.write(nb, Path(folder) / f"{slug}.ipynb")
        metadata = kernel_metadata(username, study, f"{slug}.ipynb", gpu, private)
        (Path(folder) / "kernel-metadata.json").write_text(json.dumps(metadata, indent=2))
        timeout = str(int(timeout_hours * 3600)) if timeout_hours else None
        response = _call(f"pushing {metadata['id']}", lambda: api.kernels_push(folder, timeout), lambda: _secrets(api))
    if response.error:
        raise SweeperError(f"Kaggle refused the push of {metadata['id']}: {_mask(response.error, _secrets(api))}")
    url = response.url or f"https://www.kaggle.com/code/{metadata['id']}"
    log(f"pushed {metadata['id']} version {response.version_number} ({'private' if private else 'public'}, "
        f"{gpu}, internet on); it starts now: {url}")
    if gpu == "p100":
        # What kaggle 2.2 itself says of the shape: "'NvidiaTeslaP100' is retired. Sessions run on the default GPU".
        log("note: Kaggle has retired the P100: the session runs on Kaggle's default GPU (T4 x2) instead")
    needed = notebook.secrets_needed(store)
    if needed:
        log(f"the notebook reads the Kaggle secrets {', '.join(needed)}: attach them once in the Kaggle editor "
            f"(Add-ons > Secrets), where this run will stop until they are; then launch again")
    return url


def status(study: str) -> str:
    """One line: the state of the latest run of <username>/sweeper-<study>."""
    api, username = _api()
    ref = f"{username}/{kernel_slug(study)[1]}"
    response = _call(f"reading the status of {ref}", lambda: _kernel_status(api, ref), lambda: _secrets(api))
    line = f"{ref}: {response.status.name.lower() if response.status is not None else 'no run yet'}"
    if response.failure_message:
        line += f": {_mask(response.failure_message.splitlines()[0], _secrets(api))}"
    return line + f" (https://www.kaggle.com/code/{ref})"


def _kernel_status(api, ref: str):
    """api.kernels_status turns a 401/403 into a ValueError; the SDK call it wraps keeps the HTTP status."""
    from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelSessionStatusRequest

    request = ApiGetKernelSessionStatusRequest()
    request.user_name, request.kernel_slug = ref.split("/")
    with api.build_kaggle_client() as kaggle:
        return kaggle.kernels.kernels_api_client.get_kernel_session_status(request)
