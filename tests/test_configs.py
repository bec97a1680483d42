"""Configs run more than once: grouping by params, the rule `sweeper best` picks by, and `enqueue --repeat` (whose
repeats carry their own train.seed to the runner), on real sqlite and journal stores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from optuna.trial import TrialState
from test_cli import sweeper

from sweeper.configs import RULE_SHORT, best_notes, group_configs, params_text, value_text
from sweeper.record import DIVERGED, RESULT, SEED
from sweeper.leases import hand_over
from sweeper.study import load_study, suggest

A = {"learning_rate": 1e-4, "batch_size": 8}
B = {"learning_rate": 5e-4, "batch_size": 16}
C = {"learning_rate": 1e-3, "batch_size": 8}


def init(spec_toml, url: str) -> str:
    """The store at url holding the small sweep 'demo' with a budget of 10 trials, no trials yet."""
    spec_toml.write_text(spec_toml.read_text().replace("n_trials = 6", "n_trials = 10"))
    assert sweeper("init", spec_toml, "--store", url).exit_code == 0
    return url


@pytest.fixture
def store(spec_toml, tmp_path) -> str:
    return init(spec_toml, f"journal://{tmp_path / 'sweep.log'}")


@pytest.fixture
def any_store(spec_toml, store_url) -> str:
    """A sqlite store, then a journal one."""
    return init(spec_toml, store_url)


def run(url: str, params: dict, loss: float | None, state: TrialState = TrialState.COMPLETE) -> int:
    """A trial as a worker makes one: claimed (the enqueued one first), its params suggested, then told."""
    study, spec = load_study(url, "demo")
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial(params)
    trial = study.ask()
    got = suggest(trial, spec)
    assert {k: got[k] for k in params} == params
    if state != TrialState.RUNNING:
        study.tell(trial, loss, state=state)
    return trial.number


def diverge(url: str, params: dict, evals: list[float]) -> int:
    """A trial as a worker tells one whose loss became NaN: its finite evals reported, then PRUNED with the reason."""
    study, spec = load_study(url, "demo")
    study.enqueue_trial(params)
    trial = study.ask()
    suggest(trial, spec)
    for k, loss in enumerate(evals, 1):
        trial.report(loss, k)
    trial.set_user_attr(RESULT, {"steps": 3, "total_steps": 20, "eval_losses": evals, "precision": "fp16",
                                 DIVERGED: "training loss became nan at step 3 (fp16)"})
    study.tell(trial, state=TrialState.PRUNED)
    return trial.number


def rows(*runs: tuple[int, str, dict, float | None]) -> list[dict]:
    return [{"number": n, "state": s, "params": p, "eval_loss": loss, "user_attrs": {}} for n, s, p, loss in runs]


# ---------------------------------------------------------------------------------------------
# grouping and the rule


def test_trials_of_one_config_are_grouped_however_its_numbers_were_written():
    groups = group_configs(rows((0, "COMPLETE", {"learning_rate": 1e-4, "batch_size": 8}, 1.0),
                                (1, "COMPLETE", {"learning_rate": 0.0001, "batch_size": 8.0}, 1.2),
                                (2, "WAITING", A, None), (3, "FAIL", A, None), (4, "FAIL", {}, None),
                                (5, "COMPLETE", B, 1.5)))
    first = groups[0]
    assert (first.trials, first.runs, first.pending, first.n) == ([0, 1, 2, 3], [0, 1], 1, 2)
    assert math.isclose(first.mean, 1.1) and math.isclose(first.std, math.sqrt(0.02))
    assert (first.best, first.best_trial) == (1.0, 0)
    assert groups[1].runs == [5] and groups[1].std is None


def test_params_and_values_read_to_3_significant_digits_wherever_a_person_reads_them():
    assert [value_text(v) for v in (1.959753690462899e-05, 0.123456, 2.0, 1234.5, 16, None, "cosine")] == [
        "1.96e-05", "0.123", "2", "1,234", "16", "", "cosine"]
    assert params_text({"learning_rate": 1.23456789e-4, "batch_size": 16, "lora_dropout": 0.05123}) == (
        "learning_rate=0.000123, batch_size=16, lora_dropout=0.0512")  # what the worker logs a trial's params as


def test_before_any_repeat_the_best_config_is_the_lowest_eval_loss():
    groups = group_configs(rows((0, "COMPLETE", A, 1.3), (1, "COMPLETE", B, 1.1), (2, "COMPLETE", C, 1.2),
                                (3, "PRUNED", {"learning_rate": 2e-4, "batch_size": 8}, 0.5)))
    assert [g.runs for g in groups] == [[1], [2], [0]]  # a pruned trial's loss is no result
    assert "no config has been repeated" in best_notes(groups)[0]


def test_a_single_run_within_the_noise_of_a_repeated_config_ranks_below_it():
    # A: 1.00 +- 0.03 over three runs; B once at 0.99, a hair better than A's mean but well within one run's noise.
    groups = group_configs(rows((0, "COMPLETE", A, 0.97), (1, "COMPLETE", A, 1.00), (2, "COMPLETE", A, 1.03),
                                (3, "COMPLETE", B, 0.99)))
    assert [g.runs for g in groups] == [[0, 1, 2], [3]]
    notes = best_notes(groups)
    assert any("within the noise" in n and "#3" in n for n in notes)
    assert any("#3 had a lower eval loss (0.9900) in 1 run, too few to trust over the best's 3 runs" in n
               for n in notes)


def test_a_single_run_better_by_far_more_than_the_noise_is_the_best():
    groups = group_configs(rows((0, "COMPLETE", A, 0.97), (1, "COMPLETE", A, 1.00), (2, "COMPLETE", A, 1.03),
                                (3, "COMPLETE", B, 0.80)))
    assert [g.runs for g in groups] == [[3], [0, 1, 2]]
    assert best_notes(groups) == []  # 0.20 apart: the noise (0.03) cannot explain it


def test_a_config_that_diverged_once_is_never_ranked_however_well_its_other_runs_did(store):
    run(store, A, 1.0), run(store, B, 0.9)
    diverge(store, B, [0.85])  # a repeat of B, another seed: NaN after its first eval, lower than any other

    config = json.loads(sweeper("best", "--store", store, "--json").stdout)

    assert (config["best_trial"], config["trials"]) == (0, [0])  # B's complete run would have won
    assert "never one that diverged" in config["rule"]
    assert "a config with a diverged run is never picked" in " ".join(sweeper("best", "--help").stdout.split())


# ---------------------------------------------------------------------------------------------
# enqueue --repeat


def test_enqueue_repeat_gives_each_top_config_k_runs_with_new_seeds_and_never_more(any_store):
    run(any_store, A, 1.3), run(any_store, B, 1.1), run(any_store, C, 1.2)

    first = sweeper("enqueue", "--store", any_store, "--repeat", "2", "--top", "2")
    again = sweeper("enqueue", "--store", any_store, "--repeat", "2", "--top", "2")

    assert first.exit_code == again.exit_code == 0
    assert "enqueued 4 of 4 repeats (seeds 1..2) of the top 2 configs; 0 already present" in first.stderr
    assert "enqueued 0 of 4 repeats (seeds 1..2) of the top 2 configs; 4 already present" in again.stderr
    study, _ = load_study(any_store, "demo")
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs[SEED]) for t in waiting] == [
        (B, 1), (B, 2), (C, 1), (C, 2)]  # the top two (1.1 and 1.2), each twice; A not at all


def test_a_repeat_runs_with_its_own_seed_and_joins_its_config(any_store):
    run(any_store, B, 1.1)
    assert sweeper("enqueue", "--store", any_store, "--repeat", "1", "--top", "1").exit_code == 0
    study, spec = load_study(any_store, "demo")

    trial = study.ask()
    params = suggest(trial, spec)

    assert params == {**B, "seed": 1} and spec.trial_config(params).seed == 1  # what runner.train seeds torch with
    assert trial.params == B  # the sampler sees the config, not the seed
    study.tell(trial, 1.3)
    result = json.loads(sweeper("best", "--store", any_store, "--json").stdout)
    assert (result["trials"], result["train"]["seed"]) == ([0, 1], 0) and math.isclose(result["eval_loss"], 1.2)


def test_a_worker_hands_each_repeat_its_own_seed_to_train_with(store, tmp_path, monkeypatch, fast_trainer):
    from runner import run_worker

    monkeypatch.setattr(fast_trainer, "STEP_S", 0.001)
    run(store, B, 1.1)
    sweeper("enqueue", "--store", store, "--repeat", "2", "--top", "1")

    summary = run_worker(store, "demo", max_trials=2, checkpoint_root=str(tmp_path / "c"), log=lambda line: None,
                         trainer=fast_trainer)

    assert summary.trials == [1, 2]
    for trial in load_study(store, "demo")[0].get_trials()[1:]:
        assert trial.state == TrialState.COMPLETE and trial.params == B
        last = sorted(Path(trial.user_attrs["result"]["checkpoint"]).glob("step-*.json"))[-1]
        assert json.loads(last.read_text())["params"] == {**B, "seed": trial.number}  # what run_trial was given
    assert json.loads(sweeper("best", "--store", store, "--json").stdout)["trials"] == [0, 1, 2]


def test_a_worker_never_prunes_a_repeat_but_prunes_a_new_trial_as_bad(store, tmp_path, monkeypatch, fast_trainer):
    from runner import run_worker

    monkeypatch.setattr(fast_trainer, "STEP_S", 0.001)
    study, spec = load_study(store, "demo")  # the median pruner, past its 4 startup trials from here
    for _ in range(4):  # finished trials far better at every eval than any the fast trainer makes
        study.enqueue_trial(B)
        trial = study.ask()
        suggest(trial, spec)
        for k in range(1, spec.budget.evals + 1):
            trial.report(0.1, k)
        study.tell(trial, 0.1)
    assert sweeper("enqueue", "--store", store, "--repeat", "1", "--top", "1").exit_code == 0

    summary = run_worker(store, "demo", max_trials=2, checkpoint_root=str(tmp_path / "c"), log=lambda line: None,
                         trainer=fast_trainer)

    repeat, new = (load_study(store, "demo")[0].get_trials()[n] for n in summary.trials)
    assert repeat.user_attrs[SEED] == 1 and SEED not in new.user_attrs
    assert repeat.state == TrialState.COMPLETE and sorted(repeat.intermediate_values) == [1, 2, 3, 4]  # all reported
    assert new.state == TrialState.PRUNED and sorted(new.intermediate_values) == [1, 2]  # at the first eval past warmup


def test_a_repeat_taken_over_resumes_with_the_seed_of_the_run_it_continues(store):
    run(store, B, 1.1)
    sweeper("enqueue", "--store", store, "--repeat", "1", "--top", "1")
    study, spec = load_study(store, "demo")
    repeat = study.ask()
    assert suggest(repeat, spec)["seed"] == 1
    assert hand_over(study, study._storage.get_trial(repeat._trial_id), {"stale_reason": "stale: test"}, "/ckpt/t1")

    resume = study.ask()

    assert resume.user_attrs["resumes"] == repeat.number and SEED not in resume.user_attrs
    assert suggest(resume, spec) == {**B, "seed": 1}  # its checkpoint's params match: it resumes, not restarts
    second = sweeper("enqueue", "--store", store, "--repeat", "1", "--top", "1")
    assert "enqueued 0 of 1 repeats" in second.stderr  # the resume stands for the failed repeat


def test_enqueue_repeat_past_the_budget_exits_2_and_enqueues_nothing(store):
    for i, params in enumerate([A, B, C]):
        run(store, params, 1.0 + i / 10)
    result = sweeper("enqueue", "--store", store, "--repeat", "3", "--top", "3")  # 9 repeats, room for 7
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: the study's budget of 10 trials has room for 7 more (3 finished, running or queued), not the 9 "
        "repeats asked: workers stop at the budget; raise n_trials in the sweep file and run sweeper init "
        "--overwrite"]
    assert len(load_study(store, "demo")[0].trials) == 3


@pytest.mark.parametrize(("args", "expected"), [
    (["--top", "2"], "Error: --top N goes with --repeat K"),
    (["--repeat", "2", "--grid"], "Error: give --repeat alone, or --grid / --point"),
    (["--repeat", "2", "--point", "learning_rate=2e-4,batch_size=8"], "Error: give --repeat alone"),
    (["--repeat", "0"], "Error: Invalid value for '--repeat': 0 is not in the range x>=1."),
])
def test_enqueue_repeat_bad_combinations_exit_2_with_one_line(store, args, expected):
    result = sweeper("enqueue", "--store", store, *args)
    assert result.exit_code == 2
    assert result.stdout == "" and expected in result.stderr.strip().splitlines()[-1]
    assert len(load_study(store, "demo")[0].trials) == 0


def test_enqueue_repeat_without_a_complete_trial_exits_1(store):
    run(store, A, None, TrialState.FAIL)
    result = sweeper("enqueue", "--store", store, "--repeat", "2")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: study 'demo' has no complete trial yet: nothing to repeat"


# ---------------------------------------------------------------------------------------------
# best


def test_best_picks_the_repeated_config_and_says_by_which_rule(store, tmp_path):
    for params, loss in [(A, 0.97), (A, 1.03), (A, 1.00), (B, 0.99)]:
        run(store, params, loss)

    as_json = sweeper("best", "--store", store, "--json")
    exported = sweeper("best", "--store", store, "--export", tmp_path / "best.toml")

    config = json.loads(as_json.stdout)
    assert (config["rule"], config["trials"], config["best_trial"]) == (RULE_SHORT, [0, 1, 2], 0)
    assert math.isclose(config["eval_loss"], 1.0) and math.isclose(config["eval_loss_std"], 0.03)
    assert (config["train"]["learning_rate"], config["train"]["batch_size"]) == (1e-4, 8)
    assert "note: the runner-up (trial #3, mean 0.9900) is within the noise" in as_json.stderr
    assert ("best config: trials #0, #1, #2 (mean eval loss 1.0000 ± 0.0300) written to "
            f"{tmp_path / 'best.toml'}") in exported.stderr
    assert f'rule = "{RULE_SHORT}"' in (tmp_path / "best.toml").read_text() and len(RULE_SHORT) < 120
    assert "lowest mean eval loss + standard error" in " ".join(sweeper("best", "--help").stdout.split())
