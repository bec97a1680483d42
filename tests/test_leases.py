"""Leases: heartbeats, staleness on the observer's clock, takeover (first writer wins), hand-over, retry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_cli import sweeper

from sweeper.leases import LEASE, RESUME_FROM, RESUMES, Heartbeat, Watcher, hand_over, take_over_stale
from sweeper.storage import open_storage

TESTS = Path(__file__).parent


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def initialized(tmp_path, spec_toml) -> tuple[str, optuna.Study]:
    """A sqlite store holding conftest's sweep, made by `sweeper init`, and its study."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert sweeper("init", spec_toml, "--store", url).exit_code == 0
    return url, optuna.load_study(study_name="demo", storage=open_storage(url))


def study_folder(url: str, root: Path) -> Path:
    """Where the study's checkpoints go under a checkpoint root: its name and the key init made."""
    from sweeper.study import checkpoint_folder

    return root / checkpoint_folder(optuna.load_study(study_name="demo", storage=open_storage(url)))


def running_trial(study: optuna.Study, beat: int | None) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    if beat is not None:
        trial.storage.set_trial_system_attr(trial._trial_id, LEASE, {"worker": "w/1", "beat": beat, "checkpoint": "/c"})
    return trial


def test_a_lease_is_stale_after_three_silent_beats_on_the_observers_clock():
    study = optuna.create_study()
    alive, silent = running_trial(study, beat=1), running_trial(study, beat=1)
    clock = Clock()
    watcher = Watcher(interval_s=10, clock=clock)
    assert watcher.stale(study.trials) == []  # first sight starts the clock, whatever the lease's own times say
    for beat in (2, 3, 4):
        clock.now += 10
        study._storage.set_trial_system_attr(alive._trial_id, LEASE, {"worker": "w/1", "beat": beat})
        stale = [t.number for t in watcher.stale(study.trials)]
        assert stale == ([silent.number] if beat == 4 else [])  # 30 s = 3 heartbeats without a change
    late = Watcher(interval_s=10, clock=clock)  # a worker that joins now waits the whole grace itself
    assert late.stale(study.trials) == []
    assert watcher.stale(study.trials, own={silent._trial_id}) == []  # never our own trial


def test_a_heartbeat_beats_until_the_trial_finishes_and_watches_after_each_beat():
    study = optuna.create_study()
    trial = running_trial(study, beat=None)
    watched, three = [], threading.Event()

    def watch() -> None:
        watched.append(study._storage.get_trial(trial._trial_id).system_attrs[LEASE]["beat"])
        if len(watched) == 3:
            three.set()

    heartbeat = Heartbeat(study._storage, trial._trial_id, {"worker": "w/1"}, interval_s=0.01, watch=watch)
    assert three.wait(timeout=60)
    assert watched[:3] == [2, 3, 4]  # each watch comes right after its beat (the first beats at start)
    lease = study._storage.get_trial(trial._trial_id).system_attrs[LEASE]
    assert lease["worker"] == "w/1" and abs(lease["at"] - time.time()) < 3600  # the writer's wall time
    study.tell(trial, state=TrialState.FAIL)  # as a takeover would
    heartbeat._thread.join(timeout=60)
    assert not heartbeat._thread.is_alive()  # it stopped by itself
    heartbeat.stop()


def test_a_worker_that_watched_while_training_takes_a_dead_trial_over_at_its_next_ask():
    """The kill-to-takeover bound: the lease went silent while we trained; at our ask the grace is long past."""
    study = optuna.create_study()
    dead = running_trial(study, beat=5)
    clock = Clock()
    watcher = Watcher(interval_s=2, clock=clock)  # grace 6 s
    watcher.observe(study.trials)  # our heartbeat thread, early in our trial: the dead worker's last beat
    for _ in range(45):  # our 90 s trial: we watch after each of our beats; its lease never changes
        clock.now += 2
        watcher.observe(study.trials)
    logged = []
    assert take_over_stale(study, watcher, logged.append, by="w2/2") == 1  # at once, not a grace after the ask
    failed = study._storage.get_trial(dead._trial_id)
    assert failed.state == TrialState.FAIL and "for 90 s (taken over)" in failed.user_attrs["stale_reason"]
    assert failed.user_attrs["takeover"]["by"] == "w2/2" and failed.user_attrs["takeover"]["silent_s"] == 90


def test_the_report_gives_a_running_trials_lease_age_and_marks_it_past_the_grace(initialized):
    url, study = initialized
    for age in (5, 200):
        trial = study.ask()
        study._storage.set_trial_system_attr(trial._trial_id, LEASE, {"worker": "ana/1", "beat": 1,
                                                                       "at": time.time() - age})
    notes = [r["note"] for r in json.loads(sweeper("report", "--store", url, "--json").output)]
    grace = 3 * 60  # the spec_toml fixture's heartbeat_s is 60
    assert notes[0].startswith("lease ") and "grace" not in notes[0]
    assert notes[1] == f"lease 3 min old, past the {grace // 60} min grace: the next worker to ask takes it over"


def test_two_workers_taking_over_one_trial_enqueue_one_resume(store_url):
    optuna.create_study(study_name="s", storage=open_storage(store_url))
    mine = optuna.load_study(study_name="s", storage=open_storage(store_url))
    trial = running_trial(mine, beat=1)
    takers = [optuna.load_study(study_name="s", storage=open_storage(store_url)) for _ in range(2)]
    frozen = [taker._storage.get_trial(trial._trial_id) for taker in takers]  # both judged it stale
    results = [hand_over(taker, t, {"stale_reason": "stale: test"}, "/ckpt/trial-0000") for taker, t in zip(takers, frozen)]
    assert results.count(True) == 1
    trials = optuna.load_study(study_name="s", storage=open_storage(store_url)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["stale_reason"] == "stale: test"
    assert trials[1].user_attrs == {RESUMES: 0, RESUME_FROM: "/ckpt/trial-0000"}
    assert trials[1].system_attrs["fixed_params"] == trials[0].params
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # the old worker's next write is refused
        trial.set_user_attr("result", {"eval_loss": 1.0})  # (the worker writes its result before telling)


def test_take_over_stale_resumes_and_the_report_shows_the_chain(tmp_path, initialized):
    url, study = initialized
    trial = study.ask()
    trial.suggest_float("learning_rate", 1e-4, 1e-3, log=True)
    trial.suggest_categorical("batch_size", [8, 16])
    study._storage.set_trial_system_attr(trial._trial_id, LEASE, {"worker": "ana/1", "beat": 7, "checkpoint": "/c/t0"})
    clock, logged = Clock(), []
    watcher = Watcher(interval_s=1, clock=clock)
    assert take_over_stale(study, watcher, logged.append) == 0
    clock.now += 3
    assert take_over_stale(study, watcher, logged.append) == 1
    assert logged == ["trial 0 was stale: no heartbeat from worker ana/1 for 3 s (taken over); "
                      "enqueued to resume from /c/t0"]
    resumed = study.ask()
    resumed.suggest_float("learning_rate", 1e-4, 1e-3, log=True)
    resumed.suggest_categorical("batch_size", [8, 16])
    assert resumed.params == trial.params and resumed.user_attrs[RESUME_FROM] == "/c/t0"
    study.tell(resumed, 1.5)
    rows = json.loads(sweeper("report", "--store", url, "--json").output)
    assert [(r["state"], r["note"]) for r in rows] == [
        ("FAIL", "resumed as #1; stale: no heartbeat from worker ana/1 for 3 s (taken over)"),
        ("COMPLETE", "resumes #0")]


def test_retry_re_enqueues_failed_trials_once(tmp_path, initialized):
    url, study = initialized
    for state in (TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL):
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 1e-3, log=True)
        trial.set_user_attr("result", {"fail_reason": "x", "checkpoint": f"/c/{trial.number}"})
        study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    result = sweeper("retry", "--store", url, "--failed")
    assert result.exit_code == 0 and json.loads(result.stdout) == [0, 2]
    assert "trial 0 enqueued again, to resume from /c/0" in result.stderr
    assert json.loads(sweeper("retry", "--store", url, "--failed").stdout) == []  # already resumed
    result = sweeper("retry", "--store", url, "--trial", "1")
    assert "trial 1 enqueued again, from the start" in result.stderr  # a complete trial runs afresh
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.user_attrs.get(RESUMES), t.user_attrs.get(RESUME_FROM)) for t in waiting] == [
        (0, "/c/0"), (2, "/c/2"), (1, None)]
    for args, message in ((["--trial", "9"], "no trial 9"), ([], "give --failed or --trial N"),
                          (["--failed", "--trial", "1"], "give --failed or --trial N")):
        result = sweeper("retry", "--store", url, *args)
        assert result.exit_code == 2 and message in result.output


def test_sigterm_checkpoints_and_hands_the_trial_over_and_the_next_worker_resumes_it(tmp_path, spec_table):
    import tomli_w

    spec_table["n_trials"] = 1
    (tmp_path / "sweep.toml").write_text(tomli_w.dumps(spec_table))
    url = f"journal:///{tmp_path / 's.log'}"
    assert sweeper("init", tmp_path / "sweep.toml", "--store", url).exit_code == 0
    env = {**os.environ, "FAST_TRAINER_STEP_S": "0.3"}
    args = [sys.executable, str(TESTS / "fast_trainer.py"), "--store", url, "--checkpoint-root", str(tmp_path / "c")]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = study_folder(url, tmp_path / "c") / "trial-0000" / "progress"
    deadline = time.monotonic() + 60
    while not (progress.exists() and progress.read_text() >= "3") and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=30)[0]
    assert first.returncode == 0, out
    assert "stops: SIGTERM received" in out
    trials = optuna.load_study(study_name="demo", storage=open_storage(url)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["result"]["fail_reason"] == "preempted: SIGTERM received"
    stopped_at = int(progress.read_text())

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    trials = optuna.load_study(study_name="demo", storage=open_storage(url)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["result"]["resumed_from_step"] == stopped_at  # not one step redone


def test_the_session_deadline_mid_trial_checkpoints_and_hands_the_trial_over(tmp_path, spec_table, monkeypatch,
                                                                              fast_trainer):
    import tomli_w

    import runner.worker
    from runner import run_worker

    monkeypatch.setattr(runner.worker, "DEADLINE_MARGIN_S", 2.0)  # "5 minutes before the end", scaled down
    monkeypatch.setattr(fast_trainer, "STEP_S", 0.4)  # a 3.2 s trial, in a session with 4 s left
    (tmp_path / "sweep.toml").write_text(tomli_w.dumps(spec_table))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert sweeper("init", tmp_path / "sweep.toml", "--store", url).exit_code == 0
    summary = run_worker(url, checkpoint_root=str(tmp_path / "c"), deadline_hours=4.0 / 3600, log=lambda line: None,
                         trainer=fast_trainer)
    assert summary.trials == [0] and summary.stop_reason.startswith("the session deadline is")
    trials = optuna.load_study(study_name="demo", storage=open_storage(url)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["result"]["fail_reason"].startswith("preempted: the session deadline is")
    folder = study_folder(url, tmp_path / "c") / "trial-0000"
    checkpoints = sorted(p.name for p in folder.glob("step-*"))
    assert checkpoints and trials[1].user_attrs[RESUME_FROM] == str(folder)


def test_a_restarted_worker_continues_its_own_handed_over_trial_before_fresh_points(tmp_path, spec_toml,
                                                                                    fast_trainer):
    from runner import run_worker
    from sweeper.study import load_study, suggest

    url = f"sqlite:///{tmp_path / 's.db'}"
    assert sweeper("init", spec_toml, "--store", url).exit_code == 0
    study, spec = load_study(url, "demo")
    stopped = study.ask()  # #0: a trial this machine ran, then handed over at step 4 (Ctrl-C)
    params = suggest(stopped, spec)
    assert sweeper("enqueue", "--store", url, "--point", "learning_rate=1e-4,batch_size=8",
                   "--point", "learning_rate=3e-4,batch_size=16").exit_code == 0  # #1, #2: queued meanwhile
    folder = study_folder(url, tmp_path / "c") / "trial-0000"
    folder.mkdir(parents=True)
    fast_trainer.checkpoint(folder, 4, params, [2.0, 1.9])
    hand_over(study, study._storage.get_trial(stopped._trial_id), {}, str(folder))  # #3: its resume, queued last
    summary = run_worker(url, max_trials=1, checkpoint_root=str(tmp_path / "c"), log=lambda line: None,
                         trainer=fast_trainer)
    assert summary.trials == [3]  # Optuna's ask alone pops the oldest waiting trial, #1
    resumed = study.get_trials()[3]
    assert resumed.user_attrs[RESUMES] == 0 and resumed.user_attrs["result"]["resumed_from_step"] == 4


def test_a_worker_follows_a_raised_budget_at_its_next_ask(tmp_path, spec_table, fast_trainer, monkeypatch):
    import tomli_w

    from runner import run_worker
    from sweeper.spec import spec_from_dict
    from sweeper.study import create_study

    spec_table["n_trials"] = 2
    (tmp_path / "sweep.toml").write_text(tomli_w.dumps(spec_table))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert sweeper("init", tmp_path / "sweep.toml", "--store", url).exit_code == 0
    train = fast_trainer.run_trial

    def raise_the_budget_meanwhile(*args, **kwargs):  # `sweeper init --overwrite` from another shell, mid-trial
        if not raised:
            raised.append(create_study(spec_from_dict({**spec_table, "n_trials": 3}), url, overwrite=True))
        return train(*args, **kwargs)

    raised: list = []
    monkeypatch.setattr(fast_trainer, "run_trial", raise_the_budget_meanwhile)
    lines: list[str] = []
    summary = run_worker(url, checkpoint_root=str(tmp_path / "c"), log=lines.append, trainer=fast_trainer)
    assert summary.trials == [0, 1, 2] and "budget of 3 trials is met" in summary.stop_reason
    assert "the study's spec changed (n_trials): following it from this worker's next trial" in lines


def test_retry_refuses_a_trial_whose_resume_finished_or_runs_and_retries_the_last_failed_link(initialized):
    url, study = initialized
    first = study.ask()
    first.suggest_float("learning_rate", 1e-4, 1e-3, log=True)
    first.set_user_attr("result", {"fail_reason": "preempted", "checkpoint": "/c/0"})
    study.tell(first, state=TrialState.FAIL)
    assert json.loads(sweeper("retry", "--store", url, "--failed").stdout) == [0]  # #1 resumes #0
    resume = study.ask()  # the worker takes #1
    assert resume.number == 1 and resume.user_attrs[RESUMES] == 0

    result = sweeper("retry", "--store", url, "--trial", "0")  # while #1 runs
    assert result.exit_code == 2 and "trial 0 is being resumed as #1 (running)" in result.output
    resume.set_user_attr("result", {"checkpoint": "/c/1/step-000040"})
    study.tell(resume, 1.5)
    result = sweeper("retry", "--store", url, "--trial", "0")  # #1 completed: #0's place is taken
    assert result.exit_code == 2 and "trial 0 was resumed as #1, which is complete: its result stands" in result.output
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]  # nothing enqueued

    again = study.ask()
    again.suggest_float("learning_rate", 1e-4, 1e-3, log=True)
    again.set_user_attr("result", {"fail_reason": "preempted", "checkpoint": "/c/2"})
    study.tell(again, state=TrialState.FAIL)
    assert json.loads(sweeper("retry", "--store", url, "--failed").stdout) == [2]  # #3 resumes #2...
    took = study.ask()
    took.set_user_attr("result", {"fail_reason": "preempted", "checkpoint": "/c/3"})
    study.tell(took, state=TrialState.FAIL)  # ...and was preempted too
    assert json.loads(sweeper("retry", "--store", url, "--trial", "2").stdout) == [3]  # the newest checkpoint's
    assert study.get_trials()[-1].user_attrs[RESUME_FROM] == "/c/3"
