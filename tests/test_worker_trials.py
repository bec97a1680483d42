"""A worker's trials on its trainer: one base model kept across them, and each running trial's progress in its lease."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import optuna
from test_cli import sweeper

from sweeper.leases import LEASE, Heartbeat


def test_a_worker_hands_one_base_model_to_every_trial_it_runs(tmp_path, spec_toml, monkeypatch, fast_trainer):
    from runner import run_worker

    monkeypatch.setattr(fast_trainer, "STEP_S", 0.01)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert sweeper("init", spec_toml, "--store", url).exit_code == 0
    made: list[fast_trainer.BaseModel] = []
    trainer = SimpleNamespace(**{name: getattr(fast_trainer, name) for name in (
        "quiet_libraries", "prepare_data", "preflight", "run_trial", "result_attrs", "Preempted")},
        BaseModel=lambda: made.append(fast_trainer.BaseModel()) or made[-1])
    summary = run_worker(url, max_trials=3, checkpoint_root=str(tmp_path / "c"), log=lambda line: None, trainer=trainer)
    assert summary.trials == [0, 1, 2]
    assert len(made) == 1 and made[0].trials == ["trial-0000", "trial-0001", "trial-0002"]  # (the preflight's too)


def test_the_lease_of_a_running_trial_carries_its_step_and_total_steps():
    study = optuna.create_study()
    trial = study.ask()
    beats = threading.Semaphore(0)
    heartbeat = Heartbeat(study._storage, trial._trial_id, {"worker": "w/1"}, interval_s=0.01, watch=beats.release)
    try:
        assert "step" not in study._storage.get_trial(trial._trial_id).system_attrs[LEASE]  # none before the first step
        heartbeat.progress(3, 8)
        while beats.acquire(blocking=False):  # beats released before the progress
            pass
        # The first beat to end after the drain may have read the lease before the progress; the next began after.
        assert beats.acquire(timeout=60) and beats.acquire(timeout=60)  # the timeouts only guard against a hang
        lease = study._storage.get_trial(trial._trial_id).system_attrs[LEASE]
        assert (lease["worker"], lease["step"], lease["total_steps"]) == ("w/1", 3, 8)
    finally:
        heartbeat.stop()
