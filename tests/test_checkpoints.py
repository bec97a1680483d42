"""Checkpoints read from shared places run no code, move between machines with other GPU counts, and belong to one
study: a second sweep of the same name never reads the first one's."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import TrialState

from runner import checkpoints
from runner.train import Preempted, run_trial
from runner.worker import _resume_into
from sweeper.cli import cli
from sweeper.errors import SweeperError
from sweeper.record import RESULT
from test_runner import PARAMS, demo_dir, small_spec, sweep_data, write_sweep  # noqa: F401  (fixtures)


def stopped_at_step_3(spec, data, folder: Path) -> Path:
    """A trial stopped (SIGTERM) after its third step: its checkpoint."""
    steps = iter(range(100))
    with pytest.raises(Preempted) as stopped:
        run_trial(spec, PARAMS, folder, data, log=lambda s: None,
                  stop=lambda: "SIGTERM received" if next(steps) == 2 else None)
    return stopped.value.checkpoint


class WritesAFile:
    """A pickled payload: unpickling it writes a file (what an editor of a shared Drive folder could plant)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "ran"))


def test_a_training_state_that_would_run_code_is_refused_in_one_line_and_never_runs(demo_dir, sweep_data, tmp_path):
    spec = small_spec(demo_dir)
    checkpoint = stopped_at_step_3(spec, sweep_data, tmp_path / "t")
    planted = tmp_path / "planted"
    torch.save({"optimizer": WritesAFile(planted), "scheduler": {}, "scaler": {}, "rng": {}},
               checkpoint / "training_state.pt")
    with pytest.raises(SweeperError) as refused:
        run_trial(spec, PARAMS, tmp_path / "t", sweep_data, log=lambda s: None)
    assert not planted.exists()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"checkpoint {checkpoint} refused:")
    assert "pathlib" in message and "could run code" in message  # what it names, and why it is not read


def test_a_bare_pickle_as_training_state_is_refused_too(demo_dir, sweep_data, tmp_path):
    import pickle

    spec = small_spec(demo_dir)
    checkpoint = stopped_at_step_3(spec, sweep_data, tmp_path / "t")
    planted = tmp_path / "planted"
    (checkpoint / "training_state.pt").write_bytes(pickle.dumps({"optimizer": WritesAFile(planted)}))
    with pytest.raises(SweeperError, match="no torch.save file"):
        run_trial(spec, PARAMS, tmp_path / "t", sweep_data, log=lambda s: None)
    assert not planted.exists()


def test_a_checkpoint_written_before_the_change_still_resumes_bit_exact(demo_dir, sweep_data, tmp_path):
    spec = small_spec(demo_dir)
    whole = run_trial(spec, PARAMS, tmp_path / "whole", sweep_data, log=lambda s: None)
    checkpoint = stopped_at_step_3(spec, sweep_data, tmp_path / "cut")
    # Rewrite the training state as sweeper wrote it before: the Python and numpy RNG states as their own objects.
    saved = torch.load(checkpoint / "training_state.pt", weights_only=True)
    python, state = saved["rng"]["python"], saved["rng"]["numpy"]
    saved["rng"]["python"] = (python[0], tuple(python[1]), python[2])
    saved["rng"]["numpy"] = ("MT19937", np.asarray(state["key"], dtype=np.uint32), state["pos"], state["has_gauss"],
                             state["gauss"])
    torch.save(saved, checkpoint / "training_state.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint / "training_state.pt")  # numpy's, named
    resumed = run_trial(spec, PARAMS, tmp_path / "cut", sweep_data, log=lambda s: None)
    assert resumed.resumed_from_step == 3 and resumed.eval_losses == whole.eval_losses


def test_the_training_state_holds_only_tensors_and_plain_data(demo_dir, sweep_data, tmp_path):
    checkpoint = stopped_at_step_3(small_spec(demo_dir), sweep_data, tmp_path / "t")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint / "training_state.pt") == []


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": checkpoints.rng_state()}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoints.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_checkpoint_from_two_gpus_restores_on_one(monkeypatch):
    """Simulated on the CPU: a process that sees one GPU restores the state of a checkpoint written with two."""
    restored = {}

    def set_rng_state(state, device=0):  # torch's, where one device is visible
        if device >= 1:
            raise IndexError("list index out of range")
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([1]), torch.tensor([2])])
    state = checkpoints.rng_state()  # as written where two GPUs were visible
    checkpoints.set_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], torch.tensor([1]))


def test_a_resume_path_outside_the_checkpoint_root_is_not_read(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere" / "trial-0003"
    (elsewhere / "step-000003").mkdir(parents=True)
    (elsewhere / "step-000003" / "trainer_state.json").write_text("{}")
    lines = []
    _resume_into(root / "study" / "trial-0007", str(elsewhere), root, lines.append)
    assert not (root / "study" / "trial-0007").exists()
    assert lines == [f"checkpoint folder {elsewhere} is outside this worker's checkpoint root {root}: not read; "
                     "starting from step 0"]
    link = root / "study" / "trial-0003"  # inside the root by its name, outside by where it leads
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    _resume_into(root / "study" / "trial-0008", str(link), root, lines.append)
    assert not (root / "study" / "trial-0008").exists() and "outside" in lines[-1]


def test_two_stores_with_a_study_of_the_same_name_run_their_trials_to_the_end(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPER_HOME", str(tmp_path / "home"))  # the default checkpoint root, shared by both
    sweep = write_sweep(demo_dir, tmp_path, n_trials=2)
    for store in (f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'second.db'}"):
        runner = CliRunner()
        assert runner.invoke(cli, ["init", str(sweep), "--store", store]).exit_code == 0
        done = runner.invoke(cli, ["worker", "--store", store])
        assert done.exit_code == 0, done.output
        trials = optuna.load_study(study_name="demo", storage=store).get_trials()
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.user_attrs[RESULT]
                                                                                           for t in trials]
        assert len(trials) == 2
        assert all(t.user_attrs[RESULT]["resumed_from_step"] == 0 for t in trials)
    folders = sorted(p.name for p in (tmp_path / "home" / "checkpoints").iterdir())
    assert len(folders) == 2 and all(name.startswith("demo-") for name in folders)
