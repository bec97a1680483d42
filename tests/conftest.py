"""Shared fixtures: a small valid sweep file and a real store of each local kind in tmp_path."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from pg_server import pg_store, postgres_url  # noqa: F401  (a real PostgreSQL server, session-wide)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# A valid sweep small enough to read at a glance; its grid is 4 learning rates x 2 batch sizes.
SPEC_TOML = """\
study = "demo"
n_trials = 6
sampler = "tpe"
pruner = "median"

[model]
id = "tiny/model"
max_seq_len = 64

[data]
source = "data.jsonl"

[budget]
train_tokens = 10000
evals = 4

[train]
lora_r = 8
lora_alpha = 16

[space.learning_rate]
low = 1e-4
high = 1e-3
log = true

[space.batch_size]
choices = [8, 16]
"""

GRID_SIZE = 8


def pytest_sessionstart(session: pytest.Session) -> None:
    """Say first what a result depends on, so a red run on one machine and a green one on another can be told
    apart: bitsandbytes trains differently on a CPU with AVX512-BF16 (docs/design.md), and versions move by the day."""
    from importlib.metadata import PackageNotFoundError, version

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    try:
        cpu_flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                             if line.startswith("flags")).split(":", 1)[1].split())
        cpu = ", ".join(f"{flag} {'yes' if flag in cpu_flags else 'no'}" for flag in ("avx512_bf16", "avx2"))
    except (OSError, StopIteration):
        cpu = "flags unknown (no /proc/cpuinfo)"
    versions = []
    for name in ("torch", "transformers", "peft", "bitsandbytes", "optuna"):
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} not installed")
    reporter.write_line(f"machine: CPU {cpu}; Python {sys.version.split()[0]}; " + ", ".join(versions))


def data_file(folder: Path) -> Path:
    """The sweep's data.jsonl in folder: `sweeper init` refuses a local store whose data file is missing."""
    path = folder / "data.jsonl"
    if not path.exists():
        path.write_text('{"text": "a few words to train on"}\n')
    return path


@pytest.fixture
def fast_trainer(monkeypatch):
    """tests/fast_trainer.py, for run_worker(trainer=...), on a machine that reports no GPU (as its main() does: no
    torch to import). Each test sets its STEP_S."""
    import fast_trainer as trainer
    import runner.platform

    monkeypatch.setattr(runner.platform, "gpu_info", lambda: ("cpu", 0, 0.0))
    return trainer


@pytest.fixture(autouse=True)
def no_store_from_the_environment(monkeypatch):
    """A store or study set in the shell that runs the tests never reaches a command under test."""
    monkeypatch.delenv("SWEEPER_STORE", raising=False)
    monkeypatch.delenv("SWEEPER_STUDY", raising=False)


@pytest.fixture
def spec_table(tmp_path: Path) -> dict:
    """The small valid sweep as plain data, a fresh copy for each test to change; its data file is tmp_path's."""
    table = tomllib.loads(SPEC_TOML)
    table["data"]["source"] = str(data_file(tmp_path))
    return table


@pytest.fixture
def spec_toml(tmp_path: Path) -> Path:
    """The small valid sweep written to a file, beside its data file."""
    path = tmp_path / "sweep.toml"
    path.write_text(SPEC_TOML.replace('source = "data.jsonl"', f'source = "{data_file(tmp_path)}"'))
    return path


@pytest.fixture(scope="session")
def empty_sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file holding Optuna's schema and no study: creating the schema costs 0.5 s a file."""
    from sweeper.storage import open_storage

    path = tmp_path_factory.mktemp("template") / "empty.db"
    open_storage(f"sqlite:///{path}", create=True).engine.dispose()
    return path


@pytest.fixture(params=["sqlite", "journal"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store URL of each single-machine kind, with an absolute path in tmp_path."""
    if request.param == "sqlite":
        path = tmp_path / "sweep.db"
        shutil.copyfile(request.getfixturevalue("empty_sqlite_db"), path)
        return f"sqlite:///{path}"
    (tmp_path / "sweep.log").touch()  # an empty journal: a store with no study, as init leaves it before its first op
    return f"journal://{tmp_path / 'sweep.log'}"


# ---------------------------------------------------------------------------------------------
# The notebook platforms, with stand-ins for their own modules (tests/platforms/README.md)

PLATFORM_STANDINS = Path(__file__).parent / "platforms"
PLATFORM_ENV = ("COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_USER_SECRETS_TOKEN", "SWEEPER_FAKE_COLAB_SECRETS",
                "SWEEPER_FAKE_COLAB_LOGIN", "SWEEPER_FAKE_KAGGLE_SECRETS", "SWEEPER_FAKE_KAGGLE_INTERNET")


class NotebookPlatform:
    """What a test sets of a platform: the secrets a person added (and whether the notebook may read them)."""

    def __init__(self, name: str, monkeypatch: pytest.MonkeyPatch):
        self.name, self.monkeypatch = name, monkeypatch

    def secrets(self, **values: str | tuple[str, bool]) -> None:
        """NAME="value" (readable), or on Colab NAME=("value", False): it exists, notebook access off."""
        if self.name == "colab":
            panel = {k: {"value": v[0], "access": v[1]} if isinstance(v, tuple) else {"value": v, "access": True}
                     for k, v in values.items()}
            self.monkeypatch.setenv("SWEEPER_FAKE_COLAB_SECRETS", json.dumps(panel))
        else:
            self.monkeypatch.setenv("SWEEPER_FAKE_KAGGLE_SECRETS", json.dumps(values))


def _as_platform(name: str, monkeypatch: pytest.MonkeyPatch):
    for var in PLATFORM_ENV:
        monkeypatch.delenv(var, raising=False)
    if name == "colab":
        monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20261201-060000-RC00")
    else:
        monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
        monkeypatch.setenv("KAGGLE_USER_SECRETS_TOKEN", "fake-kernel-jwt")
    monkeypatch.syspath_prepend(str(PLATFORM_STANDINS))
    yield NotebookPlatform(name, monkeypatch)
    for module in [m for m in sys.modules if m.startswith("google.colab") or m == "kaggle_secrets"]:
        del sys.modules[module]


@pytest.fixture
def on_colab(monkeypatch):
    """This process on Colab: COLAB_RELEASE_TAG set, the stand-in google.colab importable."""
    yield from _as_platform("colab", monkeypatch)


@pytest.fixture
def on_kaggle(monkeypatch):
    """This process in a Kaggle notebook: KAGGLE_KERNEL_RUN_TYPE and its secrets token set, kaggle_secrets importable."""
    yield from _as_platform("kaggle", monkeypatch)
