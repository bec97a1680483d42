"""The `sweeper` command end to end on real sqlite and journal stores: init, enqueue, report, best."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from optuna.trial import TrialState

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from conftest import GRID_SIZE
from sweeper.cli import cli
from sweeper.study import grid_points, load_study, suggest


def sweeper(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def one_error_line(result: Result) -> str:
    """The single `Error: ...` line a failing command prints, with nothing on stdout."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def initialized(spec_toml, store_url) -> str:
    """A store holding the study 'demo' of the small sweep, with no trials."""
    result = sweeper("init", spec_toml, "--store", store_url)
    assert result.exit_code == 0, result.output
    return store_url


# What runner/worker.py writes: "worker" when a trial starts, "result" when it ends.
def worker_attrs(account: str, gpu: str) -> dict:
    return {"id": f"{account}/0a1b2c3d", "account": account, "platform": "colab", "gpu": gpu}


def result_attrs(steps: int, wall: float, micro: int, accum: int, precision: str, number: int) -> dict:
    return {"steps": steps, "total_steps": steps, "wall_time_s": wall, "tokens_per_s": 1234.5, "peak_mem_mb": 5120.0,
            "micro_batch": micro, "grad_accum": accum, "precision": precision,
            "checkpoint": f"/content/ckpt/demo/trial-{number:04d}", "train_loss": [[1, 2.5], [10, 2.1], [20, 1.9]]}


# (point, final state, objective, eval losses reported, worker attrs, result attrs); trial 1 is the best.
TRIALS = [
    ({"learning_rate": 1e-4, "batch_size": 8}, TrialState.COMPLETE, 1.5, [2.0, 1.7, 1.55, 1.5],
     worker_attrs("alice", "Tesla T4"), result_attrs(40, 600.5, 4, 2, "fp16", 0)),
    ({"learning_rate": 5e-4, "batch_size": 16}, TrialState.COMPLETE, 1.2, [1.6, 1.4, 1.25, 1.2],
     worker_attrs("bob", "NVIDIA H100 80GB HBM3"), result_attrs(20, 120.0, 16, 1, "bf16", 1)),
    ({"learning_rate": 1e-3, "batch_size": 8}, TrialState.PRUNED, None, [2.5, 2.4],
     worker_attrs("alice", "Tesla T4"), result_attrs(20, 300.0, 4, 2, "fp16", 2)),
    ({"learning_rate": 2e-4, "batch_size": 16}, TrialState.FAIL, None, [],
     worker_attrs("carol", "Tesla P100-PCIE-16GB"), {"fail_reason": "RuntimeError: CUDA out of memory"}),
    ({"learning_rate": 3e-4, "batch_size": 8}, TrialState.RUNNING, None, [1.9],
     worker_attrs("bob", "Tesla T4"), None),
]
EVAL_LOSS = [1.5, 1.2, 2.4, None, 1.9]  # pruned and running trials show their last eval loss
LAST_EVAL = [4, 4, 2, None, 1]


@pytest.fixture
def with_trials(initialized) -> str:
    """The 'demo' study holding one trial in each state, made the way a worker makes them."""
    study, spec = load_study(initialized, "demo")
    for point, state, value, evals, worker, result in TRIALS:
        study.enqueue_trial(point)
        trial = study.ask()
        assert suggest(trial, spec) == point
        trial.set_user_attr("worker", worker)
        for k, loss in enumerate(evals, 1):
            trial.report(loss, k)
        if result is not None:
            trial.set_user_attr("result", result)
        if state != TrialState.RUNNING:
            study.tell(trial, value, state=state)
    return initialized


# ---------------------------------------------------------------------------------------------
# init


def test_init_creates_the_study_and_prints_its_name(spec_toml, store_url):
    result = sweeper("init", spec_toml, "--store", store_url)
    assert result.exit_code == 0
    assert result.stdout == "demo\n"
    assert "study 'demo': created" in result.stderr
    _, spec = load_study(store_url, "demo")
    assert spec.n_trials == 6 and spec.train.lora_r == 8


def test_init_twice_with_the_same_spec_says_unchanged(initialized, spec_toml):
    result = sweeper("init", spec_toml, "--store", initialized)
    assert result.exit_code == 0
    assert "study 'demo': exists, unchanged" in result.stderr


def test_init_with_a_changed_spec_exits_2_naming_the_changed_fields(initialized, spec_toml):
    spec_toml.write_text(spec_toml.read_text().replace("n_trials = 6", "n_trials = 12").replace("lora_r = 8", "lora_r = 4"))
    result = sweeper("init", spec_toml, "--store", initialized)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "study 'demo' already exists with a different spec (changed: n_trials, train.lora_r)" in line
    assert "--overwrite" in line
    assert load_study(initialized, "demo")[1].n_trials == 6


def test_init_overwrite_replaces_the_spec_and_keeps_the_trials(initialized, spec_toml):
    assert sweeper("enqueue", "--store", initialized, "--grid").exit_code == 0
    spec_toml.write_text(spec_toml.read_text().replace("n_trials = 6", "n_trials = 12"))
    result = sweeper("init", spec_toml, "--store", initialized, "--overwrite")
    assert result.exit_code == 0
    assert "study 'demo': spec replaced" in result.stderr
    study, spec = load_study(initialized, "demo")
    assert spec.n_trials == 12
    assert len(study.trials) == GRID_SIZE


def test_init_with_a_malformed_spec_exits_2_with_every_problem_on_one_line(spec_toml, store_url):
    spec_toml.write_text("colour = 1\n" + spec_toml.read_text().replace('sampler = "tpe"', 'sampler = "bayes"'))
    result = sweeper("init", spec_toml, "--store", store_url)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "sampler: expected one of" in line and "colour: unknown field" in line


def test_init_with_a_missing_sweep_file_exits_2(tmp_path, store_url):
    result = sweeper("init", tmp_path / "nope.toml", "--store", store_url)
    assert result.exit_code == 2
    assert "sweep file not found" in one_error_line(result)


# ---------------------------------------------------------------------------------------------
# enqueue


def test_enqueue_grid_enqueues_every_grid_point_once(initialized):
    result = sweeper("enqueue", "--store", initialized, "--grid")
    assert result.exit_code == 0
    assert f"enqueued {GRID_SIZE} of {GRID_SIZE} points (0 already present)" in result.stderr
    study, spec = load_study(initialized, "demo")
    assert [t.state for t in study.trials] == [TrialState.WAITING] * GRID_SIZE
    assert [t.system_attrs["fixed_params"] for t in study.trials] == grid_points(spec)


def test_enqueue_grid_twice_enqueues_nothing_new(initialized):
    sweeper("enqueue", "--store", initialized, "--grid")
    result = sweeper("enqueue", "--store", initialized, "--grid")
    assert result.exit_code == 0
    assert f"enqueued 0 of {GRID_SIZE} points ({GRID_SIZE} already present)" in result.stderr
    assert len(load_study(initialized, "demo")[0].trials) == GRID_SIZE


def test_enqueue_point_written_two_ways_is_enqueued_once(initialized):
    first = sweeper("enqueue", "--store", initialized, "--point", "learning_rate=1e-4,batch_size=16")
    again = sweeper("enqueue", "--store", initialized, "--point", " batch_size=16 , learning_rate=0.0001 ")
    assert "enqueued 1 of 1 points" in first.stderr
    assert "enqueued 0 of 1 points (1 already present)" in again.stderr


def test_enqueue_skips_finished_points_but_retries_failed_ones(with_trials):
    done, failed = "learning_rate=1e-4,batch_size=8", "learning_rate=2e-4,batch_size=16"
    result = sweeper("enqueue", "--store", with_trials, "--point", done, "--point", failed)
    assert "enqueued 1 of 2 points (1 already present)" in result.stderr
    assert load_study(with_trials, "demo")[0].trials[-1].system_attrs["fixed_params"] == {"learning_rate": 2e-4, "batch_size": 16}


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ("learning_rate=abc", "learning_rate='abc' is not a number"),
        ("learning_rate=0.5", "learning_rate=0.5 is outside the space ([0.0001, 0.001])"),
        ("batch_size=12", "batch_size=12 is outside the space ([8, 16])"),
        ("batch_size=8.5", "batch_size='8.5' is not a whole number"),
        ("batch_size=8,batch_size=16", "batch_size is given twice"),
        ("lora_r=8", "give name=value pairs for params in the space (learning_rate, batch_size)"),
        ("learning_rate", "give name=value pairs"),
        (",", "empty"),
    ],
)
def test_enqueue_bad_point_exits_2_and_enqueues_nothing(initialized, point, expected):
    result = sweeper("enqueue", "--store", initialized, "--point", "learning_rate=2e-4,batch_size=8", "--point", point)
    assert result.exit_code == 2
    assert expected in one_error_line(result)
    assert load_study(initialized, "demo")[0].trials == []


def test_enqueue_without_grid_or_point_exits_2(initialized):
    result = sweeper("enqueue", "--store", initialized)
    assert result.exit_code == 2
    assert "give --grid or at least one --point" in one_error_line(result)


# ---------------------------------------------------------------------------------------------
# report


def test_report_json_matches_the_study(with_trials):
    result = sweeper("report", "--store", with_trials, "--study", "demo", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["number"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "RUNNING"]
    assert [r["params"] for r in rows] == [t[0] for t in TRIALS]
    assert [r["eval_loss"] for r in rows] == EVAL_LOSS
    assert [r["last_eval"] for r in rows] == LAST_EVAL
    for row, (_, _, _, _, worker, result_attr) in zip(rows, TRIALS):
        assert row["user_attrs"]["worker"] == worker
        assert row["user_attrs"].get("result") == result_attr
    assert all(r["datetime_start"] for r in rows)
    assert [bool(r["datetime_complete"]) for r in rows] == [True, True, True, True, False]
    assert [json.loads(line.strip("[], ")) for line in result.stdout.splitlines()] == rows  # a trial a line


def test_report_json_of_no_trials_is_an_empty_array(initialized):
    assert json.loads(sweeper("report", "--store", initialized, "--json").stdout) == []


def test_report_json_of_waiting_trials_shows_their_enqueued_params(initialized):
    sweeper("enqueue", "--store", initialized, "--grid")
    rows = json.loads(sweeper("report", "--store", initialized, "--json").stdout)
    assert [r["state"] for r in rows] == ["WAITING"] * GRID_SIZE
    assert [r["params"] for r in rows] == grid_points(load_study(initialized, "demo")[1])


def test_report_csv_has_the_header_and_one_row_per_trial(with_trials):
    result = sweeper("report", "--store", with_trials, "--csv")
    assert result.exit_code == 0
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["number", "state", "learning_rate", "batch_size", "eval_loss", "steps", "wall_time_s",
                       "tokens_per_s", "gpu", "account", "checkpoint", "platform", "micro_batch", "grad_accum",
                       "peak_mem_mb", "fail_reason", "note"]
    assert len(rows) == 1 + len(TRIALS)
    by_name = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert by_name[1]["eval_loss"] == "1.2" and by_name[1]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert by_name[0]["checkpoint"] == "/content/ckpt/demo/trial-0000" and by_name[0]["steps"] == "40"
    assert by_name[3]["fail_reason"] == "RuntimeError: CUDA out of memory" and by_name[3]["eval_loss"] == ""


def test_report_all_shows_the_summary_and_every_trial(with_trials):
    result = sweeper("report", "--store", with_trials, "--all")
    assert result.exit_code == 0
    out = result.stdout
    assert ("study demo: 3/6 finished (complete 2, pruned 1, running 1, left 2; failed 1, outside the budget); "
            "best config #1: 1.2000, 1 run;") in out
    assert f"{(600.5 + 120 + 300) / 3600:.2f} GPU-hours" in out
    for word in ("complete", "pruned", "fail", "running", "2.4000 @2", "alice", "carol", "Tesla T4"):
        assert word in out


def test_report_json_and_csv_together_exit_2(initialized):
    result = sweeper("report", "--store", initialized, "--json", "--csv")
    assert result.exit_code == 2
    assert "give --json or --csv, not both" in one_error_line(result)


def test_report_of_a_missing_study_exits_2_and_lists_the_studies(initialized):
    result = sweeper("report", "--store", initialized, "--study", "nope")
    assert result.exit_code == 2
    assert "no study 'nope' in the store; studies here: demo" in one_error_line(result)


def test_study_may_be_omitted_when_the_store_holds_exactly_one(with_trials):
    result = sweeper("report", "--store", with_trials, "--json")
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)) == len(TRIALS)


def test_study_must_be_given_when_the_store_holds_two(initialized, spec_toml):
    spec_toml.write_text(spec_toml.read_text().replace('study = "demo"', 'study = "other"'))
    assert sweeper("init", spec_toml, "--store", initialized).exit_code == 0
    result = sweeper("report", "--store", initialized)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "give --study: the store holds studies" in line and "demo" in line and "other" in line


def test_study_must_be_given_when_the_store_is_empty(store_url):
    result = sweeper("report", "--store", store_url)
    assert result.exit_code == 2
    assert "give --study: the store holds no study" in one_error_line(result)


def test_store_and_study_may_come_from_the_environment(with_trials):
    result = sweeper("report", "--json", env={"SWEEPER_STORE": with_trials, "SWEEPER_STUDY": "demo"})
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)) == len(TRIALS)


# ---------------------------------------------------------------------------------------------
# best


def test_best_export_writes_the_best_params_over_the_specs_fixed_values(with_trials, tmp_path):
    path = tmp_path / "best.toml"
    result = sweeper("best", "--store", with_trials, "--export", path)
    assert result.exit_code == 0
    assert f"best trial #1 (eval loss 1.2000) written to {path}" in result.stderr
    config = tomllib.loads(path.read_text())
    assert (config["study"], config["best_trial"], config["eval_loss"]) == ("demo", 1, 1.2)
    train = config["train"]
    assert (train["learning_rate"], train["batch_size"]) == (5e-4, 16)  # the best trial's params
    assert (train["lora_r"], train["lora_alpha"], train["lr_scheduler"]) == (8, 16.0, "cosine")  # fixed by the spec
    assert config["model"]["id"] == "tiny/model" and config["budget_per_trial"]["train_tokens"] == 10000
    assert config["measured_on_best_trial"] == {"micro_batch": 16, "grad_accum": 1, "gpu": "NVIDIA H100 80GB HBM3",
                                                "precision": "bf16"}


def test_best_prints_toml_or_json_to_stdout(with_trials):
    as_toml = tomllib.loads(sweeper("best", "--store", with_trials).stdout)
    as_json = json.loads(sweeper("best", "--store", with_trials, "--json").stdout)
    assert as_toml == as_json and as_json["best_trial"] == 1


def test_best_without_a_complete_trial_exits_1_with_one_line(initialized):
    sweeper("enqueue", "--store", initialized, "--grid")
    result = sweeper("best", "--store", initialized)
    assert result.exit_code == 1
    assert one_error_line(result) == "Error: study 'demo' has no complete trial yet"


def test_best_export_to_a_missing_folder_exits_2(with_trials, tmp_path):
    result = sweeper("best", "--store", with_trials, "--export", tmp_path / "no" / "best.toml")
    assert result.exit_code == 2
    assert f"folder {tmp_path / 'no'} does not exist" in one_error_line(result)


def test_best_export_writes_the_format_its_suffix_names(with_trials, tmp_path):
    assert sweeper("best", "--store", with_trials, "--export", tmp_path / "best.json").exit_code == 0
    assert sweeper("best", "--store", with_trials, "--export", tmp_path / "best.toml").exit_code == 0
    assert json.loads((tmp_path / "best.json").read_text()) == tomllib.loads((tmp_path / "best.toml").read_text())


def test_enqueue_point_takes_an_integral_float_for_an_integer_param(initialized):
    assert sweeper("enqueue", "--store", initialized, "--point", "learning_rate=2e-4,batch_size=8.0").exit_code == 0
    assert load_study(initialized, "demo")[0].trials[0].system_attrs["fixed_params"] == {"learning_rate": 2e-4,
                                                                                           "batch_size": 8}


def test_stores_marks_the_kinds_this_install_cannot_open(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pymysql" else real(name, *a))
    lines = {line.split()[0]: line for line in sweeper("stores").stdout.splitlines()}
    assert lines["mysql://user:pass@host/db"].endswith("(driver missing: pip install PyMySQL)")
    assert "driver missing" not in lines["sqlite:///path.db"] + lines["postgresql://user:pass@host/db"]


# ---------------------------------------------------------------------------------------------
# bad stores


def test_bad_store_url_exits_2_listing_the_supported_schemes():
    result = sweeper("report", "--store", "s3://bucket/x", "--study", "demo")
    assert result.exit_code == 2
    assert "unknown store scheme 's3'" in one_error_line(result) and "sqlite:///path.db" in result.stderr


def test_unreachable_store_error_never_prints_the_password():
    result = sweeper("report", "--store", "postgresql://user:secret@127.0.0.1:1/db", "--study", "demo")
    assert result.exit_code in (1, 2)  # refused by the server, or no driver installed
    one_error_line(result)
    assert "secret" not in result.output


def test_stores_lists_every_store_kind():
    result = sweeper("stores")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()][:2] == ["sqlite:///path.db", "journal:///path.log"]


def test_console_script_on_a_bad_url_prints_one_error_line_and_exits_2(tmp_path):
    script = Path(sys.executable).parent / "sweeper"
    done = subprocess.run([str(script), "report", "--store", "nope://x"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("Error: unknown store scheme 'nope'")
    assert done.stdout == ""


@pytest.mark.parametrize("args", [["worker", "--store", "sqlite:///x.db"], ["doctor"], ["demo"],
                                  ["full-run", "--store", "sqlite:///x.db"]], ids=lambda a: a[0])
def test_a_training_command_without_the_runner_extra_is_one_line(args, monkeypatch):
    """`pip install -e .` alone: the control plane. What trains says what to install, before importing anything."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "bitsandbytes")
                        else find_spec(name, *a))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert one_error_line(result) == (f"Error: sweeper {args[0]} trains, and torch, bitsandbytes are not installed: "
                                      "pip install 'sweeper-qlora[runner]' (on Colab and Kaggle, which ship their own "
                                      "torch, the runner notebook installs it)")


def test_init_names_the_objective_and_gives_the_study_a_key_of_its_own(spec_toml, tmp_path):
    """Every Optuna tool (the dashboard, plots) says eval_loss, not "Objective 0"; checkpoint folders are named by the
    key, so two studies of one name in two stores never share them."""
    from sweeper.record import STUDY_KEY
    from sweeper.study import checkpoint_folder

    keys = []
    for name in ("a.db", "b.db"):
        url = f"sqlite:///{tmp_path / name}"
        assert sweeper("init", spec_toml, "--store", url).exit_code == 0
        study, _ = load_study(url, "demo")
        assert study.metric_names == ["eval_loss"]
        keys.append(study.user_attrs[STUDY_KEY])
        assert checkpoint_folder(study) == f"demo-{keys[-1]}"
        assert sweeper("init", spec_toml, "--store", url).exit_code == 0  # run again: the same key
        assert load_study(url, "demo")[0].user_attrs[STUDY_KEY] == keys[-1]
    assert keys[0] != keys[1]
