"""Divergence is a result, not a failure: a NaN/inf loss ends the trial as PRUNED with the reason, the worker goes on,
the samplers learn from it, the report counts it and `sweeper best` never picks it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import optuna
from click.testing import CliRunner
from optuna.trial import TrialState

from runner.worker import tell_result
from sweeper.cli import cli
from sweeper.record import DIVERGED, RESULT, diverged_of
from sweeper.spec import spec_from_dict
from sweeper.study import make_sampler
from test_runner import demo_dir  # noqa: F401  (a fixture)

DIVERGING = """\
study = "div16"
n_trials = 4
sampler = "random"
pruner = "none"

[model]
id = "{model}"
max_seq_len = 128

[data]
source = "{data}"
eval_examples = 64

[budget]
train_tokens = 6_000
evals = 2

[space.learning_rate]
low = 1e4
high = 1e6
log = true

[space.batch_size]
choices = [8, 16]
"""


def test_fp16_trials_that_diverge_are_results_and_the_worker_runs_all_four(demo_dir, tmp_path):
    """The issue's repro: a learning rate range where every trial diverges in fp16. Before, three failed in a row
    stopped the worker."""
    sweep = tmp_path / "div.toml"
    sweep.write_text(DIVERGING.format(model=demo_dir / "tiny-llama", data=demo_dir / "data.jsonl"))
    store = f"sqlite:///{tmp_path / 'div.db'}"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(sweep), "--store", store]).exit_code == 0
    done = runner.invoke(cli, ["worker", "--store", store, "--study", "div16", "--max-trials", "4",
                               "--checkpoint-root", str(tmp_path / "ck")], env={"SWEEPER_PRECISION": "fp16"})
    assert done.exit_code == 0, done.output
    trials = optuna.load_study(study_name="div16", storage=store).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 4
    assert all(diverged_of(t).endswith("(fp16)") and " became " in diverged_of(t) for t in trials)
    assert done.stderr.count(" diverged: ") == 4 and "failed" not in done.stderr
    report = runner.invoke(cli, ["report", "--store", store])
    assert "diverged 4" in report.stdout and "4 of 4 finished" in report.stdout
    best = runner.invoke(cli, ["best", "--store", store])
    assert best.exit_code == 1 and "no complete trial yet" in best.stderr  # never a diverged config


def sweep_with(sampler, told_as: TrialState, trials: int = 40, startup: int = 10) -> int:
    """A sweep whose learning rates above 1e-3 (the upper half of the range, on its log scale) diverge, told through
    the worker's own tell_result (told_as FAIL: how a diverged trial ended before). How many of the trials after the
    start-up ones the sampler drew in the diverging half."""
    study = optuna.create_study(sampler=sampler)
    drawn_high = 0
    for i in range(trials):
        trial = study.ask()
        lr = trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [8, 16, 32])
        if lr <= 1e-3:
            result = SimpleNamespace(diverged="", pruned_at=None, eval_loss=1 + 0.1 * (math.log10(lr) + 3.5) ** 2,
                                     tokens_per_s=1.0, wall_time_s=1.0)
            tell_result(study, trial, result, {})
            continue
        drawn_high += i >= startup
        if told_as == TrialState.PRUNED:
            result = SimpleNamespace(diverged="training loss became nan at step 3 (fp16)", pruned_at=None,
                                     eval_loss=None)
            tell_result(study, trial, result, {DIVERGED: result.diverged})
        else:
            trial.set_user_attr(RESULT, {"fail_reason": "NonFiniteLoss: training loss became nan at step 3 (fp16)"})
            study.tell(trial, state=TrialState.FAIL)
    return drawn_high


def test_tpe_learns_to_avoid_the_diverging_half_of_the_range_where_random_sampling_does_not():
    spec = spec_from_dict({"study": "s", "n_trials": 40, "model": {"id": "m"}, "data": {"source": "d.jsonl"},
                           "budget": {"train_tokens": 1000},
                           "space": {"learning_rate": {"low": 1e-5, "high": 1e-1, "log": True},
                                     "batch_size": {"choices": [8, 16, 32]}}})
    tpe = sweep_with(make_sampler(spec, worker_seed=1), TrialState.PRUNED)  # the worker's own TPE settings
    random = sweep_with(optuna.samplers.RandomSampler(seed=1), TrialState.PRUNED)
    failed = sweep_with(make_sampler(spec, worker_seed=1), TrialState.FAIL)
    # Of the 30 trials after the start-up ones, random sampling puts about half in the diverging half of the range
    # (17 here), TPE learning from the diverged ones about a quarter (9).
    assert tpe < random - 5, (tpe, random)
    assert failed > random, (failed, random)  # told FAIL, TPE never learns, and keeps drawing there
