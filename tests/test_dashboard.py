"""`sweeper dashboard`: optuna-dashboard over a journal, drive and gsheets store, seen through its API and in
headless Chromium (Debian's `chromium`); the sweeper view beside it (/sweeper/), and deleting refused unless allowed.

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
from html.parser import HTMLParser

import optuna
import pytest
from click.testing import CliRunner
from pg_server import free_port
from sheets_server import FakeSheets
from test_plots import PNG_SIGNATURE, make_study
from test_report import NAN, diverge, lease, machine_card, worker

from sweeper.cli import cli
from sweeper.configs import RULE_SHORT
from sweeper.dashboard import REFUSED
from sweeper.leases import record_worker_stop
from sweeper.record import CARD, LEASE, RESULT, SEED, WORKER
from sweeper.spec import load_spec
from sweeper.storage import open_store
from sweeper.study import SPEC_ATTR, create_study, load_study, suggest

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
def dashboard(store: str, *options: str) -> Iterator[str]:
    """`sweeper dashboard` in a process of its own on a free loopback port; yields its base URL once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "dashboard", "--store", store, "--port", str(port),
                                *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def headless(browser: str, profile) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
            "--virtual-time-budget=10000", "--window-size=1280,1400"]


def test_dashboard_page_in_headless_chromium_shows_the_study_and_its_trials(tmp_path):
    browser = chromium()
    url = make_study(tmp_path, N_COMPLETE, N_PRUNED)
    with dashboard(url) as base:
        study = the_study(base)
        assert_shows_every_trial(study)
        best = min((t for t in study["trials"] if t["state"] == "Complete"), key=lambda t: t["values"][0])
        page = f"{base}/dashboard/studies/{study['id']}"
        shot = tmp_path / "study.png"
        dom = subprocess.run([*headless(browser, tmp_path / "profile"), f"--screenshot={shot}", "--dump-dom", page],
                             capture_output=True, text=True, timeout=120).stdout

    # The page the browser built from the API: the study's name, its best trial, and each trial's learning curve.
    assert "demo (id=" in dom
    assert f"Best Trial (number={best['number']})" in dom
    assert all(f"trial #{t['number']}" in dom for t in study["trials"] if t["state"] == "Complete")
    assert f"trial #{N_COMPLETE + N_PRUNED} (running)" in dom
    assert "eval_loss" in dom and "Objective 0" not in dom  # the objective by its name

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


# ---------------------------------------------------------------------------------------------
# The sweeper view (/sweeper/), the objective's name, and deleting refused unless allowed

ODD = "<b>x</b>"  # an account name that would be markup, were it not escaped
SWEEP_TOML = ('study = "demo"\nn_trials = 20\n[model]\nid = "m"\n[data]\nsource = "d.jsonl"\n'
              "[budget]\ntrain_tokens = 200_000\nevals = 8\n")
BEST = {"learning_rate": 1e-4, "batch_size": 16}  # run twice, 1.00 and 1.04: the best config by the rule


def claim(study, spec, params, who, seed=None):
    """A trial as a worker claims it: an enqueued point asked for, its params suggested, WORKER written."""
    study.enqueue_trial(params, user_attrs={SEED: seed} if seed is not None else None)
    trial = study.ask()
    suggest(trial, spec)
    trial.set_user_attr(WORKER, who)
    return trial


def run(study, spec, params, loss, who, seed=None) -> None:
    """A trial as a worker leaves it complete: its evals reported, RESULT written, then told."""
    trial = claim(study, spec, params, who, seed)
    trial.report(loss + 0.5, 1)
    trial.report(loss, 2)
    trial.set_user_attr(RESULT, {"steps": 40, "wall_time_s": 1800.0, "gpus": 1, "eval_losses": [loss + 0.5, loss]})
    study.tell(trial, loss)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> str:
    """A sweep as its workers leave it: a config run twice (seeds), two run once, one diverged, one trial running
    (its lease beating, its worker's machine card written), a worker that stopped; two accounts, one named ODD."""
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "sweep.toml").write_text(SWEEP_TOML)
    url = f"journal://{folder / 'sweep.log'}"
    create_study(load_spec(folder / "sweep.toml"), url)
    study, spec = load_study(url, "demo")
    odd, alice = worker(ODD, "Tesla T4"), worker("alice", "NVIDIA L4")
    run(study, spec, BEST, 1.00, odd)
    run(study, spec, BEST, 1.04, odd, seed=43)
    run(study, spec, {"learning_rate": 5e-4, "batch_size": 8}, 1.10, alice)
    run(study, spec, {"learning_rate": 1e-3, "batch_size": 32}, 1.30, alice)
    diverge(study, spec, 2e-3, 16, [1.5])
    study.set_user_attr(CARD + odd["id"], machine_card(ODD))  # before its first claim
    trial = claim(study, spec, {"learning_rate": 2e-4, "batch_size": 8}, odd)
    trial.report(1.6, 1)
    beat = {**lease(ODD, 0, step=120, total_steps=400)[LEASE], "at": time.time() - 30}  # 30 s ago, on the real clock
    study._storage.set_trial_system_attr(trial._trial_id, LEASE, beat)  # as the worker's heartbeat writes it
    record_worker_stop(study, worker("ivy", "cpu"), "3 trials failed in a row; last: RuntimeError: CUDA error")
    return url


class _Tables(HTMLParser):
    """The text in each element with an id, and each table's rows of cell texts: the page as a person reads it."""

    VOID = frozenset({"meta", "link", "br", "hr", "img", "input"})  # elements without an end tag

    def __init__(self, page: str) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self._in: list[str | None] = []  # the id (or None) of each element we are in, outermost first
        self.feed(page)

    def _table(self) -> list[list[str]] | None:
        return next((self.tables[i] for i in reversed(self._in) if i in self.tables), None)

    def handle_starttag(self, tag, attrs):
        element = dict(attrs).get("id")
        if element:
            self.text[element] = ""
            if tag == "table":
                self.tables[element] = []
        if (table := self._table()) is not None and tag in ("tr", "td", "th"):
            table.append([]) if tag == "tr" else table[-1].append("")
        if tag not in self.VOID:
            self._in.append(element)

    def handle_endtag(self, tag):
        if tag not in self.VOID and self._in:
            self._in.pop()

    def handle_data(self, data):
        for element in filter(None, self._in):
            self.text[element] += data
        if (table := self._table()) and table[-1]:
            table[-1][-1] += data


def test_sweeper_view_in_headless_chromium_shows_workers_best_config_accounts_and_divergence(sweep, tmp_path):
    browser = chromium()
    with dashboard(sweep) as base:
        shot = tmp_path / "sweeper.png"
        dom = subprocess.run([*headless(browser, tmp_path / "profile"), f"--screenshot={shot}", "--dump-dom",
                              f"{base}/sweeper/"], capture_output=True, text=True, timeout=120).stdout
    page = _Tables(dom)

    # The worker running trial #5: its lease as the report gives it, and its machine card.
    (header, row) = page.tables["workers"]
    running = dict(zip(header, row))
    assert running["worker"] == f"{ODD}/0a1b2c3d" and running["trial"] == "#5" and running["step"] == "120/400"
    assert running["lease"].startswith("lease ") and running["lease"].endswith(" s old")  # within the grace
    assert (running["GPU"], running["precision"], running["micro-batch"]) == ("Tesla T4 (7.5)", "fp16", "4")
    assert running["fused"] == "no: the fused kernels need compute capability 8.0"
    assert running["preflight"] == "pass 5/6 in 14 s"
    assert page.text["stopped"] == ("worker ivy/0a1b2c3d (ivy, colab, cpu) stopped: 3 trials failed in a row; last: "
                                    "RuntimeError: CUDA error")

    # The best config by the rule: the one run twice, with its runs; the leaderboard under it.
    assert page.text["best"] == ("learning_rate=0.0001, batch_size=16: mean eval loss 1.0200 ± 0.0283 over 2 runs "
                                 "(#0, #1)")
    assert page.text["rule"] == f"rule: {RULE_SHORT}"
    header, *configs = page.tables["leaderboard"]
    assert [dict(zip(header, c))["trials"] for c in configs] == ["#0, #1", "#2", "#3"]
    assert dict(zip(header, configs[0]))["runs"] == "2"

    # GPU-hours per account (half an hour a complete trial), the diverged trial counted and named.
    header, *accounts = page.tables["accounts"]
    hours = {a[0]: (a[1], a[3], a[4]) for a in accounts}
    assert hours[ODD] == ("colab", "3", "1.00") and hours["alice"] == ("colab", "2", "1.00")
    assert "diverged 1" in page.text["progress"]
    assert page.tables["diverged-trials"][1] == ["#4", "learning_rate=0.002, batch_size=16", NAN]

    # The account name is text on the page, never markup.
    assert "&lt;b&gt;x&lt;/b&gt;" in dom and ODD not in dom

    from matplotlib.image import imread

    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(shot)
    assert image.shape[:2] == (1400, 1280)
    assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::13]}) > 10  # text drawn, not a blank page


def test_sweeper_view_escapes_what_the_store_holds_and_runs_no_script(sweep):
    with dashboard(sweep) as base, urllib.request.urlopen(f"{base}/sweeper/", timeout=10) as answer:
        page = answer.read().decode()
        policy = answer.headers["Content-Security-Policy"]
    assert "&lt;b&gt;x&lt;/b&gt;/0a1b2c3d" in page and ODD not in page
    assert "<script" not in page and policy.startswith("default-src 'none'")


def test_a_sweeper_study_made_before_metric_names_shows_eval_loss_and_the_store_is_not_written(tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP_TOML)
    url = f"journal://{tmp_path / 'sweep.log'}"
    storage = open_store(url, create=True).storage
    study = optuna.create_study(study_name="demo", storage=storage, direction="minimize")
    study.set_user_attr(SPEC_ATTR, load_spec(tmp_path / "sweep.toml").to_dict())  # as sweeper init did before
    with dashboard(url) as base:
        assert the_study(base)["objective_names"] == ["eval_loss"]
    assert optuna.load_study(study_name="demo", storage=open_store(url).storage).metric_names is None


def send(url: str, method: str, body: dict | None = None) -> tuple[int, str]:
    """A request as optuna-dashboard's page sends it (JSON); its status and body, an error's too."""
    request = urllib.request.Request(url, method=method, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_deleting_or_renaming_a_study_is_refused_unless_allow_delete(tmp_path):
    url = make_study(tmp_path, 1)
    with dashboard(url) as base:
        study = the_study(base)
        assert send(f"{base}/api/studies/{study['id']}", "DELETE") == (403, json.dumps({"reason": REFUSED}))  # a line
        status, _ = send(f"{base}/api/studies/{study['id']}/rename", "POST", {"study_name": "other"})
        assert status == 403  # a rename deletes the original
        assert [s["study_name"] for s in get_json(f"{base}/api/studies")["study_summaries"]] == ["demo"]
    assert optuna.get_all_study_names(open_store(url).storage) == ["demo"]  # in the store itself
    with dashboard(url, "--allow-delete") as base:
        assert send(f"{base}/api/studies/{study['id']}", "DELETE")[0] == 204
    assert optuna.get_all_study_names(open_store(url).storage) == []
