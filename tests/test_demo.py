"""`sweeper demo` and `sweeper worker`, run as a user runs them: the console script in a subprocess."""

from __future__ import annotations

import json
import shutil
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
    assert "%|" not in done.stderr  # read later (a pipe, a batch log): the eval lines, no progress bar
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


def test_worker_on_an_unknown_study_is_one_line_and_exit_2(tmp_path, empty_sqlite_db):
    shutil.copyfile(empty_sqlite_db, tmp_path / "x.db")
    done = sweeper("worker", "--store", f"sqlite:///{tmp_path / 'x.db'}", "--study", "nope", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["Error: no study 'nope' in the store; the store holds no study yet (run sweeper init)"]


def test_worker_on_a_store_that_is_not_there_creates_none(tmp_path):
    done = sweeper("worker", "--store", f"sqlite:///{tmp_path / 'typo.db'}", "--study", "demo", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"Error: no store at {tmp_path / 'typo.db'} (run sweeper init first)"]
    assert list(tmp_path.iterdir()) == []


def test_demo_into_an_unwritable_folder_is_one_line_and_exit_1(tmp_path):
    done = sweeper("demo", "--dir", "/proc/sweeper-demo", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("Error: cannot write the demo into /proc/sweeper-demo")
    assert "Traceback" not in done.stderr


def sweep_with_model(tmp_path, model_id: str) -> str:
    """A study of this model, made as `sweeper init` makes it but without init's check of a local model: the folder
    that went away after init, or a store whose workers run elsewhere."""
    from conftest import SPEC_TOML

    from sweeper.spec import load_spec
    from sweeper.study import create_study

    (tmp_path / "sweep.toml").write_text(SPEC_TOML.replace('id = "tiny/model"', f'id = "{model_id}"'))
    (tmp_path / "data.jsonl").write_text('{"text": "a few words"}\n')  # init checks that a local store's data is there
    store = f"sqlite:///{tmp_path / 's.db'}"
    create_study(load_spec(tmp_path / "sweep.toml"), store)
    return store


def test_a_model_id_that_is_no_folder_is_one_line_and_the_store_says_which_worker_stopped(tmp_path):
    store = sweep_with_model(tmp_path, "/no/such/model")
    refused = sweeper("init", "sweep.toml", "--store", f"sqlite:///{tmp_path / 'new.db'}", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip() == (  # init says so first, on this machine
        "Error: sweep.toml: model.id '/no/such/model' is a path, and there is no model folder there")
    done = sweeper("worker", "--store", store, "--account", "ana", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Error: model.id '/no/such/model' is a path, and there is no folder there"
    report = sweeper("report", "--store", store, cwd=tmp_path).stdout
    assert "(ana, local, cpu) stopped: model.id '/no/such/model' is a path, and there is no folder there" in report


def test_a_hub_model_without_internet_fails_after_one_try_in_one_line(tmp_path):
    import os

    store = sweep_with_model(tmp_path, "team/tiny-model")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # nothing listens
    done = subprocess.run([sys.executable, "-m", "sweeper.cli", "worker", "--store", store], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Retrying" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: cannot download model 'team/tiny-model' from the Hugging Face Hub: no internet: enable it "
        "(on Kaggle: Settings > Internet) or point model.id at a local copy")
