"""`sweeper report`: the default view, `--all`, `--top` and `--watch` at 80 and 200 columns; nothing a user copies
is cropped, and data is never markup."""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import optuna
import pytest
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from rich.console import Console
from rich.text import Text

from sweeper import leases, overview
from sweeper.cli import cli
from sweeper.leases import record_worker_stop
from sweeper.record import LEASE
from sweeper.report import trial_rows
from sweeper.spec import load_spec
from sweeper.study import create_study, load_study

LONG_PATH = "/content/drive/MyDrive/sweeps/a-team-sweep-with-a-long-name/checkpoints/trial-0001-of-the-learning-rate-scan"
DISTRIBUTIONS = {"learning_rate": FloatDistribution(3e-5, 2e-3, log=True),
                 "batch_size": CategoricalDistribution([8, 16, 32])}
# (learning rate, batch size, eval loss, account, gpu, checkpoint): the best at 1.9e-3 (the top edge of the range),
# its config run twice, 0.2 apart: more than the gap to the next config.
COMPLETE = [(1.9e-3, 16, 1.00, "[lab]", "NVIDIA A100-SXM4-40GB", LONG_PATH),
            (1.9e-3, 16, 1.20, "研究室", "Tesla T4", "/ckpt/[bold]x/:smile:/trial-0002"),
            (1e-3, 16, 1.15, "alice", "Tesla T4", "/ckpt/3"), (5e-4, 8, 1.30, "bob smith", "NVIDIA L4", "/ckpt/4"),
            *((10 ** (-4.5 + k / 6), [8, 16, 32][k % 3], 1.4 + k / 20, "carol", "Tesla P100-PCIE-16GB", f"/ckpt/{k + 5}")
              for k in range(9))]


def add(study, state, lr, batch, value=None, evals=(), attrs=None, system=None):
    study.add_trial(optuna.trial.create_trial(
        state=state, value=value, params={"learning_rate": lr, "batch_size": batch}, distributions=DISTRIBUTIONS,
        intermediate_values={k + 1: v for k, v in enumerate(evals)}, user_attrs=attrs or {}, system_attrs=system or {}))


def worker(account, gpu):
    return {"id": f"{account}/0a1b2c3d", "account": account, "platform": "colab", "gpu": gpu}


NOW = time.time()  # the report's clock in these tests: lease ages never depend on how long the suite takes


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(overview, "time", SimpleNamespace(time=lambda: NOW, sleep=lambda s: time.sleep(s)))
    monkeypatch.setattr(leases, "time", SimpleNamespace(time=lambda: NOW, monotonic=time.monotonic))


def lease(account, age_s, **progress):
    return {LEASE: {"worker": f"{account}/0a1b2c3d", "account": account, "platform": "kaggle", "checkpoint": "/c",
                    "beat": 3, "at": NOW - age_s, **progress}}


def make_study(folder, trials=COMPLETE, extra=True, kind="journal") -> str:
    (folder / "sweep.toml").write_text('study = "demo"\nn_trials = 20\n[model]\nid = "m"\n[data]\nsource = "d.jsonl"\n'
                                       "[budget]\ntrain_tokens = 200_000\nevals = 8\n")
    url = f"journal://{folder / 'sweep.log'}" if kind == "journal" else f"sqlite:///{folder / 'sweep.db'}"
    create_study(load_spec(folder / "sweep.toml"), url)
    study, _ = load_study(url, "demo")
    for lr, batch, loss, account, gpu, path in trials:
        add(study, TrialState.COMPLETE, lr, batch, loss, [loss + 0.5, loss], {
            "worker": worker(account, gpu), "result": {"steps": 40, "wall_time_s": 600.0, "checkpoint": path}})
    if extra:
        add(study, TrialState.PRUNED, 3e-5, 32, evals=[2.5, 2.4], attrs={"worker": worker("dan", "Tesla T4")})
        add(study, TrialState.FAIL, 2e-4, 8, attrs={"worker": worker("erin", "Tesla T4"),
                                                    "result": {"fail_reason": "RuntimeError: CUDA out of memory"}})
        add(study, TrialState.RUNNING, 1e-4, 16, evals=[1.9], attrs={"worker": worker("frank", "Tesla T4")},
            system=lease("frank", 5, step=120, total_steps=400))
        add(study, TrialState.RUNNING, 2e-4, 8, evals=[2.1, 1.8, 1.7], attrs={"worker": worker("gina", "NVIDIA L4")},
            system=lease("gina", 30))  # a worker from before leases carried the step
        add(study, TrialState.RUNNING, 3e-4, 32, attrs={"worker": worker("hal", "Tesla T4")},
            system=lease("hal", 3600))  # silent for an hour: past the 3 min grace
        add(study, TrialState.WAITING, 6e-4, 8)
        record_worker_stop(study, {"id": "ivy/0a1b2c3d", "account": "ivy", "platform": "local", "gpu": "cpu"},
                           f"model.id '{LONG_PATH}' is a path, and there is no folder there")
    return url


@pytest.fixture(scope="module", params=["journal", "sqlite"])
def store(request, tmp_path_factory) -> str:
    return make_study(tmp_path_factory.mktemp("report"), kind=request.param)


def report(*args: str, width: int = 80) -> str:
    result = CliRunner().invoke(cli, ["report", *args], env={"COLUMNS": str(width)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


WIDTHS = pytest.mark.parametrize("width", [80, 200])


@WIDTHS
def test_default_view_fits_the_width_and_shows_every_section(store, width):
    out = report("--store", store, width=width)
    warnings = out[out.index("\nimportance"):]  # each a line of its own, for the terminal to wrap
    assert max(map(len, out[:len(out) - len(warnings)].splitlines())) <= width and "…" not in out  # nothing cropped
    assert "demo: 14 of 20 finished · best #0 1.0000 · 2.17 GPU-hours" in out
    assert "complete 13  pruned 1  failed 1  running 3  queued 1" in out
    assert "workers: 2 alive, 1 silent, 1 stopped" in out
    assert "leaderboard: top 10 of 12 configs" in out and "running: 3" in out
    assert "best eval loss: learning rate x batch size" in out and "importance (PED-ANOVA): learning_rate" in out
    assert "/ckpt/3" not in out  # checkpoint paths are for --all, --json, --csv


@WIDTHS
def test_a_path_in_a_warning_is_never_cropped_or_broken(store, width):
    out = report("--store", store, width=width)
    assert re.search(rf"^worker ivy/0a1b2c3d \(ivy, local, cpu\) stopped: model.id '{re.escape(LONG_PATH)}' is a path",
                     out, re.M)


@WIDTHS
def test_default_view_warns_what_a_person_acts_on(store, width):
    out = report("--store", store, width=width)  # each warning a line of its own: a path in one copies whole
    assert re.search(r"^worker hal/0a1b2c3d is silent: trial #17's lease 6\d min old, past the 3 min grace: the next "
                     "worker to ask takes it over$", out, re.M)
    assert "the best learning_rate, 0.0019, is at the high edge of the range 3e-05..0.002: widen the range" in out
    assert "the runs of #0's config disagree: spread 0.1414, more than the 0.0500 between it and #2's" in out
    assert "1 failed trial not retried; the latest, #14 (erin, Tesla T4): RuntimeError: CUDA out of memory" in out


def test_running_trials_show_step_of_total_or_the_eval_an_older_worker_reached(store):
    out = report("--store", store, width=200)
    frank = next(line for line in out.splitlines() if "frank/0a1b2c3d" in line)
    gina = next(line for line in out.splitlines() if "gina/0a1b2c3d" in line)
    assert re.search(r"120/400 +1\.9000 +\d+ s$", frank.rstrip()), frank  # step/total and the lease's age
    assert re.search(r"eval 3/8 +1\.7000 +\d+ s$", gina.rstrip()), gina


def test_leaderboard_shows_mean_spread_and_runs_of_a_repeated_config(store):
    first = next(line for line in report("--store", store, width=200).splitlines() if line.lstrip().startswith("0 "))
    assert first.split() == ["0", "0.0019", "16", "1.1000", "0.1414", "2", "NVIDIA", "A100-SXM4-40GB", "[lab]", "10", "min"]


def test_top_limits_the_leaderboard(store):
    out = report("--store", store, "--top", "2")
    assert "leaderboard: top 2 of 12 configs" in out
    board = out[out.index("leaderboard"):out.index("running:")]
    assert len(re.findall(r"^ *\d+ +0\.\d+ ", board, re.M)) == 2


@WIDTHS
def test_all_lists_every_trial_with_checkpoint_paths_whole(store, width):
    out = report("--store", store, "--all", width=width)
    lines = out.splitlines()
    assert lines[0].startswith("study demo: 14/20 finished")
    assert lines[-1].startswith("worker ivy/0a1b2c3d (ivy, local, cpu) stopped: ")
    table = [line for line in lines[1:-1] if not re.match(r" +(checkpoint|note|GPU|account): ", line)]  # the rest: below a row
    assert all(len(line) <= width for line in table)
    assert [int(line.split()[0]) for line in table[1:]] == list(range(19))
    assert re.search(f"(checkpoint: | ){re.escape(LONG_PATH)}$", out, re.M) and "2.4000 @2" in out
    assert re.search(r"lease 6\d min old, past the 3 min grace: the next worker to ask takes it over", out)


def test_all_and_the_view_show_markup_and_emoji_codes_in_data_as_written(store):
    assert "[lab]" in report("--store", store, width=200)
    out = report("--store", store, "--all", width=200)
    assert "[lab]" in out and "研究室" in out and "/ckpt/[bold]x/:smile:/trial-0002" in out


def test_no_control_code_in_the_data_reaches_the_terminal(tmp_path):
    url = make_study(tmp_path, [(1e-4, 8, 1.0, "eve\x1b[2J\nx", "Tesla T4", "/ckpt/1")], extra=False)
    for args in (["--all"], []):
        out = report("--store", url, *args, width=200)
        assert "\x1b" not in out and "eve" in out


def test_importances_wait_for_enough_complete_trials(tmp_path):
    out = report("--store", make_study(tmp_path, COMPLETE[:3], extra=False))
    assert "importances: after 10 complete trials (3 so far)" in out


def test_watch_redraws_as_trials_land_until_ctrl_c(tmp_path):
    url = make_study(tmp_path, COMPLETE[:2], extra=False)
    study, spec = load_study(url, "demo")
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True)
    sleeps = []

    def sleep(seconds):  # each wait, another trial lands; Ctrl-C on the third
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt
        add(study, TrialState.COMPLETE, 1e-4, 8, 2.0 + len(sleeps))

    def render():
        trials = study.get_trials(deepcopy=False)
        stopped = [f"worker ivy/0 stopped: no folder {LONG_PATH}"]
        return overview.view(study, spec, trials, trial_rows(study, trials=trials), 180, stopped, 80, live=True)

    overview.watch(console, render, 7.5, sleep=sleep)
    assert sleeps == [7.5] * 3
    text = Text.from_ansi(out.getvalue()).plain  # (without the colours and cursor moves)
    assert [n for n in ("2 of 20", "3 of 20", "4 of 20", "5 of 20") if n in text] == ["2 of 20", "3 of 20", "4 of 20"]
    assert max(map(len, text.splitlines())) <= 80  # redrawn in place: every line fits, warnings wrapped


def test_watch_from_the_command_leaves_on_ctrl_c_with_exit_0(store, monkeypatch):
    def ctrl_c(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", ctrl_c)
    result = CliRunner().invoke(cli, ["report", "--store", store, "--watch", "--interval", "2"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and result.exception is None
    assert "leaderboard: top 10 of 12 configs" in result.stdout and "Traceback" not in result.output


def test_watch_with_all_json_or_csv_exits_2(store):
    result = CliRunner().invoke(cli, ["report", "--store", store, "--watch", "--json"])
    assert result.exit_code == 2
    assert "Error: --watch redraws the default view: drop --all, --json and --csv" in result.stderr
