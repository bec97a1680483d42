"""`sweeper dashboard`: optuna-dashboard over a journal, drive and gsheets store, seen through its API and in
headless Chromium (Debian's `chromium`).

Without a chromium binary the browser test is skipped, unless SWEEPER_REQUIRE_CHROMIUM=1 (CI sets it, as it sets
SWEEPER_REQUIRE_POSTGRES for the PostgreSQL server), which makes that a failure instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from click.testing import CliRunner
from pg_server import free_port
from sheets_server import FakeSheets
from test_plots import PNG_SIGNATURE, make_study

from sweeper.cli import cli

REQUIRE_ENV = "SWEEPER_REQUIRE_CHROMIUM"
N_COMPLETE, N_PRUNED = 4, 1  # and one running: six trials, the best of them complete
FAST_SHEETS = {"SWEEPER_GSHEETS_SETTLE_S": "0.01", "SWEEPER_GSHEETS_SETTLE_MAX_S": "0.01",
               "SWEEPER_GSHEETS_SYNC_S": "0.3", "SWEEPER_GSHEETS_BACKOFF_S": "0.01"}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        why = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why}; {REQUIRE_ENV}=1 requires the dashboard's browser test to run", pytrace=False)
        pytest.skip(why)
    return found


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


@contextmanager
def dashboard(store: str) -> Iterator[str]:
    """`sweeper dashboard` in a process of its own on a free loopback port; yields its base URL once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "dashboard", "--store", store, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # a bounded wait for it to listen: up to 60 s on a loaded machine
            if process.poll() is not None:
                pytest.fail(f"sweeper dashboard exited {process.returncode}: {process.stdout.read()}")
            try:
                get_json(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        else:
            pytest.fail("sweeper dashboard never answered")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def the_study(base: str) -> dict:
    """The study as the dashboard's API gives it: its id, name and trials."""
    (summary,) = get_json(f"{base}/api/studies")["study_summaries"]
    return {"id": summary["study_id"], **get_json(f"{base}/api/studies/{summary['study_id']}")}


def assert_shows_every_trial(study: dict) -> None:
    assert study["name"] == "demo"
    states = sorted(t["state"] for t in study["trials"])
    assert states == sorted(["Complete"] * N_COMPLETE + ["Pruned"] * N_PRUNED + ["Running"])


def test_dashboard_page_in_headless_chromium_shows_the_study_and_its_trials(tmp_path):
    browser = chromium()
    url = make_study(tmp_path, N_COMPLETE, N_PRUNED)
    with dashboard(url) as base:
        study = the_study(base)
        assert_shows_every_trial(study)
        best = min((t for t in study["trials"] if t["state"] == "Complete"), key=lambda t: t["values"][0])
        page = f"{base}/dashboard/studies/{study['id']}"
        headless = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--window-size=1280,1400"]
        shot = tmp_path / "study.png"
        dom = subprocess.run([*headless, f"--screenshot={shot}", "--dump-dom", page], capture_output=True, text=True,
                             timeout=120).stdout

    # The page the browser built from the API: the study's name, its best trial, and each trial's learning curve.
    assert "demo (id=" in dom
    assert f"Best Trial (number={best['number']})" in dom
    assert all(f"trial #{t['number']}" in dom for t in study["trials"] if t["state"] == "Complete")
    assert f"trial #{N_COMPLETE + N_PRUNED} (running)" in dom

    from matplotlib.image import imread

    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(shot)
    assert image.shape[:2] == (1400, 1280)
    assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::13]}) > 50  # charts drawn, not a blank page


def test_dashboard_serves_a_drive_store(tmp_path):
    url = make_study(tmp_path, N_COMPLETE, N_PRUNED, url=f"drive://{tmp_path / 'shared'}")
    with dashboard(url) as base:
        assert_shows_every_trial(the_study(base))


def test_dashboard_serves_a_google_sheet(tmp_path, monkeypatch):
    with FakeSheets() as fake:
        account = fake.add_service_account()
        env = {"SWEEPER_GSHEETS_ENDPOINT": fake.url, "SWEEPER_GSHEETS_CREDENTIALS": json.dumps(account), **FAST_SHEETS}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        url = make_study(tmp_path, N_COMPLETE, N_PRUNED, url=f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}")
        with dashboard(url) as base:
            assert_shows_every_trial(the_study(base))


def test_dashboard_on_a_port_in_use_exits_1_in_one_line(tmp_path):
    url = make_study(tmp_path, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["dashboard", "--store", url, "--port", str(port)], catch_exceptions=False)
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot serve on 127.0.0.1:{port}: ")


def test_dashboard_without_the_package_names_the_pip_extra_in_one_line(tmp_path, monkeypatch):
    url = make_study(tmp_path, 1)
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as if not installed
    result = CliRunner().invoke(cli, ["dashboard", "--store", url], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: optuna_dashboard is not installed; it comes with the report extra: pip install 'sweeper-qlora[report]'"]
