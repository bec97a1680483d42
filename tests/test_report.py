"""`sweeper report`: the default view, `--all`, `--top` and `--watch` at 80 and 200 columns; nothing a user copies
is cropped, and data is never markup."""

from __future__ import annotations

import io
import re
import time
from datetime import datetime
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
from sweeper.record import CARD, DIVERGED, LEASE, RESULT, RESUMES
from sweeper.report import trial_rows
from sweeper.spec import ParamSpec, load_spec
from sweeper.study import create_study, load_study, suggest

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


def make_study(folder, trials=COMPLETE, extra=True, kind="journal", n_trials=20) -> str:
    (folder / "sweep.toml").write_text(f'study = "demo"\nn_trials = {n_trials}\n[model]\nid = "m"\n[data]\nsource = "d.jsonl"\n'
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
    assert "demo: 14 of 20 finished · best config #0: 1.1000, mean of 2 runs" in out  # by `sweeper best`'s rule
    assert "█ complete 13  ▓ pruned 1  ▒ running 3  ░ queued 1  · left 2\nfailed 1, outside the budget\n" in out
    assert "workers: 2 alive, 1 silent, 1 stopped · 2.17 GPU-hours" in out
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
    assert "the best config's learning_rate, 0.0019, is at the high edge of the range 3e-05..0.002: widen the range" in out
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
    assert lines[0] == ("study demo: 14/20 finished (complete 13, pruned 1, running 3, queued 1, left 2; failed 1, "
                        "outside the budget); best config #0: 1.1000, mean of 2 runs; 2.17 GPU-hours")
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
    assert f"read at {datetime.fromtimestamp(NOW):%H:%M:%S}; Ctrl-C leaves" in result.stdout  # when it was read


def test_a_study_with_no_trial_says_what_to_do_next(tmp_path, spec_toml):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    assert CliRunner().invoke(cli, ["init", str(spec_toml), "--store", url]).exit_code == 0
    result = CliRunner().invoke(cli, ["report", "--store", url], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert (f"no trial yet: start a worker (sweeper worker --store {url} --study demo, or a runner notebook: sweeper "
            f"notebook), after queueing points if you want them first (sweeper enqueue --store {url} --study demo "
            "--grid)") in result.stdout  # one line, whole: the commands copy


# ---------------------------------------------------------------------------------------------
# diverged trials and the workers' machine cards

NAN = "training loss became nan at step 3 (fp16)"


def machine_card(account, gpu="Tesla T4", capability="7.5", precision="fp16", micro_batch=4, fused=False, ok=True):
    """A card as runner/doctor.py writes it: 6 checks, fused kernels skipped where off; not ok: memory failed."""
    checks = [{"name": name, "status": "pass", "seconds": seconds, "detail": "ok"} for name, seconds in
              [("device", 0.12), ("bitsandbytes", 0.4), ("precision", 1.1), ("training step", 3.2), ("memory", 9.2)]]
    checks.append({"name": "fused kernels", "status": "pass" if fused else "skip", "seconds": 0.0, "detail": ""})
    if not ok:
        checks[4] |= {"status": "fail", "detail": "out of memory at micro-batch 1"}
    return {"worker": worker(account, gpu), "device": "cuda:0", "gpu": gpu, "capability": capability,
            "memory_gb": 15.6, "versions": {"torch": "2.11.0+cu128", "cuda": "12.8", "bitsandbytes": "0.50.2"},
            "precision": precision, "micro_batch": micro_batch, "gradient_checkpointing": False, "fused": fused,
            "fused_note": "" if fused else "the fused kernels need compute capability 8.0", "checks": checks,
            "ok": ok, "seconds": 14.2, "at": NOW - 600}


def diverge(study, spec, lr, batch, evals, reason=NAN):
    """A trial as the worker tells one whose loss became NaN: PRUNED, with its reason in RESULT."""
    study.enqueue_trial({"learning_rate": lr, "batch_size": batch})
    trial = study.ask()
    suggest(trial, spec)
    for k, loss in enumerate(evals, 1):
        trial.report(loss, k)
    trial.set_user_attr(RESULT, {"steps": 3, "total_steps": 40, "eval_losses": list(evals), "precision": "fp16",
                                 DIVERGED: reason})
    study.tell(trial, state=TrialState.PRUNED)


@pytest.fixture(scope="module")
def diverged_store(tmp_path_factory) -> str:
    """The complete trials (the best #0 at 1.9e-3), then #13 diverged at 2e-3 after one eval, #14 at 3e-5 before
    any, #15 pruned; frank, gina and hal running, with cards from frank and gina (hal's worker is from before cards),
    and a failed one from kim, who stopped."""
    url = make_study(tmp_path_factory.mktemp("diverged"), extra=False)
    study, spec = load_study(url, "demo")
    diverge(study, spec, 2e-3, 8, [1.9])
    diverge(study, spec, 3e-5, 8, [], "eval loss became inf at eval 1 (fp16)")
    add(study, TrialState.PRUNED, 3e-5, 32, evals=[2.5, 2.4])
    for account, gpu, age in [("frank", "Tesla T4", 5), ("gina", "NVIDIA L4", 30), ("hal", "Tesla T4", 3600)]:
        add(study, TrialState.RUNNING, 1e-4, 16, attrs={"worker": worker(account, gpu)}, system=lease(account, age))
    study.set_user_attr(CARD + "frank/0a1b2c3d", machine_card("frank"))
    study.set_user_attr(CARD + "gina/0a1b2c3d", machine_card("gina", "NVIDIA L4", "8.9", "bf16", 8, True))
    study.set_user_attr(CARD + "kim/0a1b2c3d", machine_card("kim", ok=False))
    record_worker_stop(study, worker("kim", "Tesla T4"), "preflight failed: memory: out of memory at micro-batch 1")
    return url


@WIDTHS
def test_diverged_trials_are_counted_apart_from_the_pruned(diverged_store, width):
    out = report("--store", diverged_store, width=width)
    assert "demo: 16 of 20 finished · best config #0: 1.1000, mean of 2 runs" in out  # diverged: in the budget
    assert "█ complete 13  ▓ pruned 1  × diverged 2  ▒ running 3  ░ queued 0  · left 1\nworkers:" in out
    summary = report("--store", diverged_store, "--all", width=width).splitlines()[0]
    assert summary.startswith("study demo: 16/20 finished (complete 13, pruned 1, diverged 2, running 3, left 1);")


def test_diverged_trials_have_a_colour_of_their_own_in_the_bar(diverged_store):
    study, spec = load_study(diverged_store, "demo")
    trials = study.get_trials(deepcopy=False)
    bar = overview.view(study, spec, trials, trial_rows(study, trials=trials), 180, [], 80).renderables[1]
    assert [(span.style, span.end - span.start) for span in bar.spans][:3] == [
        ("green", 51), ("yellow", 4), ("magenta", 7)]  # 13, 1 and 2 of the budget's 20, in 78 cells


def test_all_says_why_a_trial_diverged(diverged_store):
    out = report("--store", diverged_store, "--all", width=200)
    assert re.search(rf"^13 +pruned +0.002 +8 +1.9000 @1\n +note: diverged: {re.escape(NAN)}$", out, re.M)
    assert re.search(r"^14 +pruned +3e-05 +8\n +note: diverged: eval loss became inf at eval 1 \(fp16\)$", out, re.M)
    assert re.search(r"^15 +pruned +3e-05 +32 +2.4000 @2\n16 ", out, re.M)  # pruned by the pruner: no note


@WIDTHS
def test_a_best_config_next_to_a_diverged_trial_is_warned_of(diverged_store, width):
    out = report("--store", diverged_store, width=width)  # #13 at 2e-3 is nearer the best's 1.9e-3 than #14 at 3e-5
    assert re.search(rf"^trial #13 diverged at learning_rate 0.002, next to the best config's 0.0019 \(#0\): "
                     rf"{re.escape(NAN)}. Train the full run at a lower learning rate, or in bf16 where the GPU has it",
                     out, re.M)
    assert out.count("kim/0a1b2c3d") == 1  # its failed preflight: a stopped worker, said once


@WIDTHS
def test_machines_of_the_running_workers_fit_the_width(diverged_store, width):
    out = report("--store", diverged_store, width=width)
    assert max(map(len, out[:out.index("\nimportance")].splitlines())) <= width and "…" not in out
    machines = out[out.index("machines: 2"):out.index("best eval loss")].splitlines()
    frank, gina = (next(line.strip() for line in machines if line.lstrip().startswith(w)) for w in ("frank/", "gina/"))
    assert frank.split()[1:5] == ["Tesla", "T4", "(7.5)", "fp16"] and frank.endswith("pass 5/6 in 14 s")
    assert gina.split()[1:5] == ["NVIDIA", "L4", "(8.9)", "bf16"] and gina.endswith("pass 6/6 in 14 s")
    if width == 200:
        assert frank.split()[5:7] == ["4", "no"] and gina.split()[5:7] == ["8", "yes"]
    assert not any(w in line for line in machines for w in ("hal/", "kim/"))  # no card; not running


def test_watch_with_all_json_or_csv_exits_2(store):
    result = CliRunner().invoke(cli, ["report", "--store", store, "--watch", "--json"])
    assert result.exit_code == 2
    assert "Error: --watch redraws the default view: drop --all, --json and --csv" in result.stderr


# ---------------------------------------------------------------------------------------------
# the budget's figures, its bar without colour, and the learning rate x batch size table


def view_text(url: str, width: int, spec_change=None) -> str:
    """The default view as a terminal without colour shows it (piped, or NO_COLOR)."""
    study, spec = load_study(url, "demo")
    if spec_change:
        spec_change(spec)
    trials = study.get_trials(deepcopy=False)
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(
        overview.view(study, spec, trials, trial_rows(study, trials=trials), 180, [], width), crop=False)
    assert "\x1b" not in out.getvalue()
    return out.getvalue()


def test_the_bar_tells_the_states_apart_without_colour(store):
    lines = view_text(store, 80).splitlines()
    assert lines[1] == "█" * 51 + "▓" * 4 + "▒" * 11 + "░" * 4 + "·" * 8  # 13, 1, 3, 1 and 2 left of 20: 78 cells
    assert lines[2] == "█ complete 13  ▓ pruned 1  ▒ running 3  ░ queued 1  · left 2"  # the legend


def test_the_best_config_goes_on_a_line_of_its_own_rather_than_break(store):
    lines = view_text(store, 60).splitlines()
    assert lines[:2] == ["demo: 14 of 20 finished", "best config #0: 1.1000, mean of 2 runs"]


def test_the_budgets_figures_add_up_to_it_with_failed_and_surplus_queued_trials_said_apart(tmp_path):
    """A budget of 12: 8 complete, #8 failed and resumed as #9 (queued: it holds #8's place, once), #10 failed, #11
    running, and 3 more queued, of which 2 fit."""
    url = make_study(tmp_path, COMPLETE[:8], extra=False, n_trials=12)
    study, _ = load_study(url, "demo")
    add(study, TrialState.FAIL, 2e-4, 8, attrs={"stale_reason": "stale: no heartbeat for 3 min"})
    add(study, TrialState.WAITING, 2e-4, 8, attrs={RESUMES: 8})
    add(study, TrialState.FAIL, 3e-4, 8, attrs={RESULT: {"fail_reason": "surplus: the budget's last trials"}})
    add(study, TrialState.RUNNING, 1e-4, 16, system=lease("frank", 5))
    for lr in (4e-4, 5e-4, 6e-4):
        add(study, TrialState.WAITING, lr, 8)

    lines = report("--store", url).splitlines()

    assert lines[0] == "demo: 8 of 12 finished · best config #0: 1.1000, mean of 2 runs"
    assert set(lines[1]) == {"█", "▒", "░"}  # every place in the budget held
    assert lines[2:5] == ["█ complete 8  ▓ pruned 0  ▒ running 1  ░ queued 3  · left 0",
                          "failed 2, outside the budget",
                          "queued 1 beyond the budget: they run only if n_trials is raised"]
    assert report("--store", url, "--all").splitlines()[0] == (
        "study demo: 8/12 finished (complete 8, running 1, queued 3; failed 2, outside the budget; queued 1 beyond "
        "the budget); best config #0: 1.1000, mean of 2 runs; 1.33 GPU-hours")


def test_the_learning_rate_x_batch_table_marks_pruned_and_diverged_trials_where_none_completed(tmp_path):
    url = make_study(tmp_path, COMPLETE[:3], extra=False)  # 1.9e-3 and 1e-3, batch 16
    study, spec = load_study(url, "demo")
    add(study, TrialState.PRUNED, 3e-5, 32, evals=[2.5, 2.4])
    diverge(study, spec, 2e-3, 8, [1.9])
    diverge(study, spec, 1e-4, 32, [])  # before its first eval: no loss to show

    out = report("--store", url, width=200)

    table = out[out.index("best eval loss"):out.index("importance")]
    rows = [line.split() for line in table.splitlines()]
    assert ["3e-05–6.9e-05", "·", "·", "2.4000p", "1"] in rows
    assert ["6.9e-05–0.00016", "·", "·", "d", "1"] in rows
    assert ["0.00086–0.002", "1.9000d", "1.0000", "·", "4"] in rows  # the complete trials' cell unmarked
    assert "p pruned, d diverged: their last eval loss, where no trial completed" in table


def test_a_learning_rate_x_batch_table_too_wide_leaves_out_whole_columns_and_says_which(store):
    def eight_sizes(spec):
        spec.space["batch_size"] = ParamSpec("batch_size", choices=[8, 16, 32, 64, 128, 256, 512, 1024])

    out = view_text(store, 80, eight_sizes)

    table = out[out.index("best eval loss"):out.index("importance")]
    assert "…" not in table and max(map(len, table.splitlines())) <= 80
    assert "batch 128" in table.splitlines()[2]  # the header: the smaller sizes kept
    assert "batch 256, batch 512, batch 1024: left out, too wide for 80 columns" in table
