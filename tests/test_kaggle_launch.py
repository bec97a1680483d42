"""`sweeper launch kaggle` through the official kaggle client against a fake Kaggle API (tests/kaggle_server.py).

The command runs in a subprocess, as a user runs it: the client reads its endpoint override when it is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import nbformat
import pytest
from kaggle_server import USERS, FakeKaggle

# Not imported here: importing kaggle signs in, with this process's credentials, and makes a config folder in $HOME.
if importlib.util.find_spec("kaggle") is None:
    pytest.skip("the kaggle client is not installed (Python 3.11+)", allow_module_level=True)

ALICE = USERS["alice"]
STORE = "postgresql://bob:pg-Secret-42@db.example.com/sweeps"


@pytest.fixture
def fake():
    server = FakeKaggle()
    yield server
    server.close()


def sweeper(fake: FakeKaggle, tmp_path, *args: str, **credentials: str) -> subprocess.CompletedProcess:
    """The CLI with only the given Kaggle credentials, pointed at the fake through the client's own override."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "SWEEPER_")) and "proxy" not in k.lower()}
    env.update(HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(tmp_path / "kaggle"), KAGGLE_API_ENVIRONMENT="LOCALHOST",
               http_proxy=fake.url, SWEEPER_KAGGLE_TIMEOUT_S="10")
    env.update(credentials)
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def launch(fake, tmp_path, *args: str, **credentials: str) -> subprocess.CompletedProcess:
    return sweeper(fake, tmp_path, "launch", "kaggle", "--store", STORE, "--study", "demo", *args, **credentials)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    return lines[0]


def no_secret_in(*texts: str) -> None:
    for text in texts:
        for secret in (ALICE["token"], ALICE["key"], "pg-Secret-42"):
            assert secret not in text


def test_push_writes_a_private_gpu_notebook_with_internet_and_names_the_secrets(fake, tmp_path):
    done = launch(fake, tmp_path, "--timeout", "2.5", KAGGLE_API_TOKEN=ALICE["token"])

    assert done.returncode == 0, done.stderr
    assert done.stdout == "https://www.kaggle.com/code/alice/sweeper-demo\n"
    assert "pushed alice/sweeper-demo version 1 (private, t4x2, internet on)" in done.stderr
    assert "Kaggle secrets SWEEPER_STORE: attach them once in the Kaggle editor (Add-ons > Secrets)" in done.stderr
    assert [r["method"] for r in fake.requests] == ["IntrospectToken", "SaveKernel"]
    push = fake.requests[-1]
    assert push["host"] == "localhost" and push["url"].endswith("/api/v1/kernels.KernelsApiService/SaveKernel")
    assert push["user"] == "alice"
    body = push["body"]
    assert body["slug"] == "alice/sweeper-demo" and body["newTitle"] == "sweeper demo"
    assert (body["kernelType"], body["language"]) == ("notebook", "python")
    assert body["isPrivate"] is True and body["enableGpu"] is True and body["enableInternet"] is True
    assert body["machineShape"] == "NvidiaTeslaT4" and body["sessionTimeoutSeconds"] == 9000
    nb = nbformat.reads(body["text"], as_version=4)
    nbformat.validate(nb)
    params = nb.cells[1].source
    assert "store = None" in params and "secrets = ['SWEEPER_STORE']" in params
    assert "account = 'kaggle:alice'" in params and "deadline_hours = 2.5" in params
    no_secret_in(body["text"], done.stdout, done.stderr)


def test_a_second_push_is_a_new_version_and_the_metadata_follows_the_options(fake, tmp_path):
    creds = {"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": ALICE["key"]}  # the legacy key: HTTP Basic, no introspection
    assert launch(fake, tmp_path, **creds).returncode == 0
    done = launch(fake, tmp_path, "--gpu", "p100", "--public", "--account", "ana", **creds)

    assert done.returncode == 0, done.stderr
    assert "version 2 (public, p100" in done.stderr and "Kaggle has retired the P100" in done.stderr
    assert [r["method"] for r in fake.requests] == ["SaveKernel", "SaveKernel"]
    body = fake.requests[-1]["body"]
    assert body["isPrivate"] is False and body["machineShape"] == "NvidiaTeslaP100" and "sessionTimeoutSeconds" not in body
    assert "account = 'ana'" in body["text"]


def test_kaggle_json_in_the_config_folder_is_used(fake, tmp_path):
    (tmp_path / "kaggle").mkdir()
    (tmp_path / "kaggle" / "kaggle.json").write_text(json.dumps({"username": "alice", "key": ALICE["key"]}))
    (tmp_path / "kaggle" / "kaggle.json").chmod(0o600)
    done = sweeper(fake, tmp_path, "launch", "kaggle", "--store", "gsheets://1AbC", "--study", "demo")

    assert done.returncode == 0, done.stderr
    assert "Kaggle secrets SWEEPER_GSHEETS_CREDENTIALS" in done.stderr
    assert "secrets = ['SWEEPER_GSHEETS_CREDENTIALS']" in fake.requests[-1]["body"]["text"]


def test_status_shows_the_state_of_the_latest_run(fake, tmp_path):
    assert launch(fake, tmp_path, KAGGLE_API_TOKEN=ALICE["token"]).returncode == 0
    fake.kernels["alice/sweeper-demo"].update(status="ERROR", failure="attach the Kaggle secret SWEEPER_STORE\nmore")
    done = sweeper(fake, tmp_path, "launch", "kaggle", "--study", "demo", "--status", KAGGLE_API_TOKEN=ALICE["token"])

    assert done.returncode == 0, done.stderr
    assert done.stdout == ("alice/sweeper-demo: error: attach the Kaggle secret SWEEPER_STORE "
                           "(https://www.kaggle.com/code/alice/sweeper-demo)\n")
    assert fake.requests[-1]["method"] == "GetKernelSessionStatus"


def test_status_of_a_kernel_never_pushed_is_one_line_and_exit_2(fake, tmp_path):
    done = sweeper(fake, tmp_path, "launch", "kaggle", "--study", "nope", "--status", KAGGLE_API_TOKEN=ALICE["token"])
    assert done.returncode == 2
    assert "alice/sweeper-nope" in one_error_line(done) and "HTTP 404" in done.stderr


def test_missing_credentials_are_one_line_and_exit_2(fake, tmp_path):
    done = launch(fake, tmp_path)
    assert done.returncode == 2
    assert one_error_line(done).startswith("Error: no Kaggle credentials: set KAGGLE_API_TOKEN")
    assert fake.requests == []


@pytest.mark.parametrize("credentials, expected", [
    ({"KAGGLE_API_TOKEN": "KGAT_revoked_0123456789"}, "Kaggle did not accept the access token from KAGGLE_API_TOKEN"),
    ({"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": "wrong-key-0123456789"}, "Kaggle refused the credentials (HTTP 401"),
    ({"KAGGLE_USERNAME": "mallory", "KAGGLE_KEY": ALICE["key"]}, "Kaggle refused the credentials (HTTP 401"),
])
def test_bad_credentials_are_one_line_exit_2_and_never_echoed(fake, tmp_path, credentials, expected):
    done = launch(fake, tmp_path, **credentials)
    assert done.returncode == 2
    assert expected in one_error_line(done)
    no_secret_in(done.stdout, done.stderr)
    for value in credentials.values():
        assert len(value) < 10 or value not in done.stderr


@pytest.mark.parametrize("status, headers, expected", [
    (429, {"Retry-After": "30"}, "Kaggle is limiting requests (HTTP 429: injected fault); try again in 30 s"),
    (503, {}, "Kaggle failed while pushing alice/sweeper-demo (HTTP 503: injected fault); try again later"),
    (500, {}, "(HTTP 500: injected fault)"),
])
def test_server_errors_are_one_line_and_exit_1(fake, tmp_path, status, headers, expected):
    fake.faults.append((status, headers))
    done = launch(fake, tmp_path, KAGGLE_USERNAME="alice", KAGGLE_KEY=ALICE["key"])
    assert done.returncode == 1
    assert expected in one_error_line(done)


def test_a_server_that_does_not_answer_is_one_line_and_exit_1(fake, tmp_path):
    fake.hang.set()
    done = launch(fake, tmp_path, KAGGLE_USERNAME="alice", KAGGLE_KEY=ALICE["key"], SWEEPER_KAGGLE_TIMEOUT_S="1")
    assert done.returncode == 1
    assert one_error_line(done) == "Error: Kaggle did not answer within 1 s while pushing alice/sweeper-demo; try again later"


def test_unreachable_kaggle_is_one_line_and_exit_1(fake, tmp_path):
    fake.close()
    done = launch(fake, tmp_path, KAGGLE_USERNAME="alice", KAGGLE_KEY=ALICE["key"])
    assert done.returncode == 1
    assert "cannot reach Kaggle while pushing alice/sweeper-demo" in one_error_line(done)


def test_a_store_on_this_machine_cannot_be_launched(fake, tmp_path):
    done = sweeper(fake, tmp_path, "launch", "kaggle", "--store", "sqlite:///sweeps.db", "--study", "demo",
                   KAGGLE_API_TOKEN=ALICE["token"])
    assert done.returncode == 2
    assert "a Kaggle notebook cannot reach sqlite:///sweeps.db" in one_error_line(done)
    assert fake.requests == []


def test_timeout_beyond_kaggles_session_limit_is_bad_input(fake, tmp_path):
    done = launch(fake, tmp_path, "--timeout", "13", KAGGLE_API_TOKEN=ALICE["token"])
    assert done.returncode == 2
    assert "at most 9 hours" in one_error_line(done)
