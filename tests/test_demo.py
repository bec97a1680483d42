"""`sweeper demo` and `sweeper worker`, run as a user runs them: the console script in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
from optuna.trial import TrialState
from worker_log import foreign_lines

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def sweeper(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_demo_runs_a_real_sweep_and_prints_the_report_and_best_config(tmp_path):
    done = sweeper("demo", "--dir", "d", "--trials", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert foreign_lines(done.stderr) == []  # the log is the user's: no bitsandbytes, tqdm or warning lines
    table, _, config_text = done.stdout.partition("study = ")
    assert "study demo: 4/4 finished" in table and "1e-05" in table and "0.3" in table
    config = tomllib.loads("study = " + config_text)
    assert config["train"]["batch_size"] in (8, 16) and config["model"]["quantize"] == "nf4"

    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'd' / 'sweeps.db'}")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # The three enqueued points run first; the middle learning rate beats both ends.
    losses = {t.params["learning_rate"]: t.value for t in trials[:3]}
    assert losses[3e-3] < losses[1e-5] and losses[3e-3] < losses[0.3]
    assert config["best_trial"] == study.best_trial.number


def test_worker_command_joins_a_study_and_reports_what_it_ran(tmp_path):
    assert sweeper("demo", "--dir", "d", "--trials", "2", cwd=tmp_path).returncode == 0
    store = f"sqlite:///{tmp_path / 'd' / 'sweeps.db'}"
    # The demo's study is full; a second worker on it runs nothing and says why.
    done = sweeper("worker", "--store", store, "--study", "demo", "--account", "bob", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["trials"] == [] and "budget of 2 trials is met" in out["stop_reason"]
    assert out["worker"].startswith("bob/")


def test_worker_on_an_unknown_study_is_one_line_and_exit_2(tmp_path):
    done = sweeper("worker", "--store", f"sqlite:///{tmp_path / 'x.db'}", "--study", "nope", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["Error: no study 'nope' in the store; the store holds no study yet (run sweeper init)"]


def test_demo_into_an_unwritable_folder_is_one_line_and_exit_1(tmp_path):
    done = sweeper("demo", "--dir", "/proc/sweeper-demo", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("Error: cannot write the demo into /proc/sweeper-demo")
    assert "Traceback" not in done.stderr
