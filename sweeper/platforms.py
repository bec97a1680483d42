"""The notebook platforms (colab, kaggle, local): which one this process runs on, its secrets, its login, Drive.

One rule for detection, used by the runner and the credentials alike. Kaggle first: its image also ships
google.colab and sets COLAB_RELEASE_TAG (docs/design.md); Kaggle sets KAGGLE_KERNEL_RUN_TYPE in interactive and batch
runs. Colab: its kernel's shell is google.colab's, and its VM sets COLAB_RELEASE_TAG for every process, so a
`!sweeper worker` subprocess is on Colab too.

Each exception the platforms' own modules raise (google.colab.userdata, google.colab.auth, google.colab.drive,
kaggle_secrets) becomes a one-line UserError saying what to do. No secret value is ever printed or put in a message.
"""

from __future__ import annotations

import os

from sweeper.errors import UserError

STORE_SECRET = "SWEEPER_STORE"
DRIVE_MOUNT = "/content/drive"
KAGGLE_OFFLINE = "Kaggle's secrets service is unreachable: turn on Settings > Internet, then run again"


def platform_name(environ: dict[str, str] | None = None, ipython_repr: str | None = None) -> str:
    environ = os.environ if environ is None else environ
    if "KAGGLE_KERNEL_RUN_TYPE" in environ:
        return "kaggle"
    if "COLAB_RELEASE_TAG" in environ:
        return "colab"
    if ipython_repr is None:
        try:
            from IPython import get_ipython

            ipython_repr = str(get_ipython())
        except ImportError:
            ipython_repr = ""
    return "colab" if "google.colab" in ipython_repr else "local"


# ---------------------------------------------------------------------------------------------
# Secrets


def platform_secret(name: str) -> str | None:
    """The platform's secret `name` (Colab's Secrets panel, Kaggle's Add-ons > Secrets); None where there is none."""
    platform = platform_name()
    if platform == "colab":
        try:
            from google.colab import userdata  # type: ignore[import-not-found]
        except ImportError:
            return None
        try:
            return userdata.get(name)
        except userdata.SecretNotFoundError:
            return None
        except userdata.NotebookAccessError:
            raise UserError(f"the Colab secret {name} exists but this notebook may not read it: turn on its "
                            "\"Notebook access\" switch (the key icon on the left), then run again") from None
    if platform == "kaggle":
        try:
            from kaggle_secrets import BackendError, CredentialError, UserSecretsClient  # type: ignore[import-not-found]
        except ImportError:
            return None
        try:
            client = UserSecretsClient()
        except CredentialError:  # raised when the session has no KAGGLE_USER_SECRETS_TOKEN
            raise UserError("this Kaggle session has no secrets token (KAGGLE_USER_SECRETS_TOKEN): run the notebook "
                            f"in Kaggle's editor or as a Kaggle run, or set {name} as an environment variable") from None
        try:
            return client.get_secret(name)
        except BackendError:  # the service's answer for a secret not attached to this notebook
            return None
        except CredentialError:  # HTTP 401/403
            raise UserError("Kaggle refused this session's secrets token: save a new version of the notebook and "
                            "run it again") from None
        except ConnectionError:  # no internet, or a timeout
            raise UserError(KAGGLE_OFFLINE) from None
    return None


def how_to_add_secret(name: str) -> str:
    return {"colab": f"add a Colab secret named {name} (the key icon on the left) and turn on its notebook access",
            "kaggle": f"attach a Kaggle secret named {name} to this notebook (Add-ons > Secrets)",
            }.get(platform_name(), f"set the environment variable {name}")


_read_from_secret: dict[str, str] = {}


def notebook_secrets(names: list[str], store: str | None, optional: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """Read each secret a runner notebook needs into its environment variable (the environment wins), and the store
    URL (given, or the secret SWEEPER_STORE); with a line per secret saying where it came from, never its value."""
    wanted = list(dict.fromkeys([*names, *([] if store else [STORE_SECRET])]))
    lines = []
    for name in wanted:
        secret = f"the {platform_name().capitalize()} secret {name}"
        if os.environ.get(name):
            read_before = _read_from_secret.get(name) == os.environ[name]  # by this cell, in an earlier run
            lines.append(f"{name}: from {secret if read_before else 'the environment variable'}")
            continue
        value = platform_secret(name)
        if value:
            os.environ[name] = _read_from_secret[name] = value
            lines.append(f"{name}: from {secret}")
        elif name in optional:
            lines.append(f"{name}: not set")
        else:
            raise UserError(f"no secret {name}: {how_to_add_secret(name)}, then run again")
    return store or os.environ[STORE_SECRET], lines


# ---------------------------------------------------------------------------------------------
# Colab: the Google login and Drive


def colab_login() -> str:
    """Sign in to Google in this Colab session (the gsheets store's credentials when there is no key)."""
    from google.colab import auth, errors  # type: ignore[import-not-found]

    try:
        auth.authenticate_user()
    except errors.AuthorizationError:
        raise UserError("the Google login was declined or failed: run this cell again and allow access, or "
                        f"{how_to_add_secret('SWEEPER_GSHEETS_CREDENTIALS')} holding a service-account key") from None
    return "Google Sheets: as the Google account you signed in with (share the sheet with it, as Editor)"


def mount_drive(mountpoint: str = DRIVE_MOUNT) -> None:
    """Mount Google Drive once; a cell run again finds it mounted (google.colab.drive's own test) and does nothing."""
    from google.colab import drive  # type: ignore[import-not-found]

    if os.path.isdir(os.path.join(mountpoint, "My Drive")):
        return
    try:
        drive.mount(mountpoint)
    except ValueError as e:  # "Mountpoint must not already contain files", "mount failed", ...
        raise UserError(f"cannot mount Google Drive at {mountpoint} ({e}): Runtime > Disconnect and delete runtime, "
                        "then Run all") from None
