"""The sweep-efficiency ground truth and its replay (bench/), and the cost `sweeper init` prints up front."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from sweeper.cli import cli
from sweeper.spec import default_space
from sweeper.study import load_study

BENCH = Path(__file__).resolve().parent.parent / "bench" / "sweep_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sweep_efficiency", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep_efficiency"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table(bench):
    return bench.load_table()


def test_shipped_ground_truth_is_a_full_grid_of_curves_wider_than_the_default_range(table):
    lrs = sorted({lr for lr, _ in table.runs})
    default = default_space()["learning_rate"]
    assert len(lrs) >= 8 and lrs[0] < default.low and lrs[-1] > default.high
    assert {bs for _, bs in table.runs} == set(default_space()["batch_size"].choices)
    assert all(sorted(r["seed"] for r in runs) == [0, 1, 2] for runs in table.runs.values())
    for runs in table.runs.values():
        for run in runs:
            if run["state"] == "COMPLETE":
                assert [e[0] for e in run["evals"]] == list(range(1, table.points + 1))
                times = [e[2] for e in run["evals"]]
                assert times == sorted(times) and times[-1] <= run["cpu_s"]
    assert table.points > table.spec.budget.evals  # more eval points than a sweep uses: any pruning point replays
    assert math.isfinite(table.best_loss) and table.grid_cost > 0


def test_replay_of_one_setting_is_deterministic_for_a_seed(bench, table):
    first = bench.replay(table, "tpe + median", workers=4, seed=3, n_trials=12)
    assert first == bench.replay(table, "tpe + median", workers=4, seed=3, n_trials=12)
    assert first != bench.replay(table, "tpe + median", workers=4, seed=4, n_trials=12)
    assert first[-1][2] == 12  # every trial of the budget finished
    used = [u for u, *_ in first]
    assert used == sorted(used) and used[-1] < 12 * max(r["cpu_s"] for rs in table.runs.values() for r in rs)


def test_replayed_full_grid_runs_every_point_and_keeps_the_lowest_loss_it_saw(bench, table):
    trajectory = bench.replay(table, "grid", workers=8, seed=0)
    assert trajectory[-1][2] == len(table.runs)
    found = trajectory[-1][3]
    # Seed noise may pick another point, but only one that has a seed beating one of the best point's seeds.
    final = [r["evals"][-1][1] for r in table.runs[found]]
    assert min(final) <= max(r["evals"][-1][1] for r in table.runs[table.best])


# ---------------------------------------------------------------------------------------------
# sweeper init: the expected cost


def init(*args) -> object:
    return CliRunner().invoke(cli, ["init", *map(str, args)], catch_exceptions=False)


def cost_lines(result) -> str:
    """The cost `init` prints: its first line and the indented ones after it, as one text."""
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("expected cost:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[start:end])


def test_init_prices_a_new_sweep_from_the_speed_shipped_for_its_model_and_names_its_source(spec_toml, store_url):
    spec_toml.write_text(spec_toml.read_text().replace('id = "tiny/model"', 'id = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"'))
    result = init(spec_toml, "--store", store_url)
    assert result.exit_code == 0, result.output
    text = cost_lines(result)
    hours = 6 * 10_000 / 2116 / 3600  # conftest's sweep: 6 trials x 10,000 tokens
    assert text.startswith("expected cost: 6 trials x 10,000 tokens:\n")
    assert f"  {hours:.2g} GPU-hours on H100 (2,116 tok/s, BENCHMARKS.md" in text
    assert "other GPUs: priced once a trial there completes" in text
    assert max(map(len, text.splitlines())) <= 120  # lines a person reads, not one of 337 characters


def test_init_says_it_cannot_price_a_model_nothing_was_measured_for(spec_toml, store_url):
    result = init(spec_toml, "--store", store_url)  # tiny/model: no trial yet, no shipped speed
    assert result.exit_code == 0, result.output
    assert cost_lines(result) == ("expected cost: 6 trials x 10,000 tokens; GPU-hours not known yet:\n"
                                  "  no trial of this study has completed, and no speed is shipped for tiny/model\n"
                                  "  (sweeper init --overwrite prices it once one has)")
    assert "H100" not in result.stderr  # another model's figure says nothing of this one


def test_init_overwrite_prices_the_sweep_from_the_measured_speed_of_each_gpu(spec_toml, store_url):
    assert init(spec_toml, "--store", store_url).exit_code == 0
    study, spec = load_study(store_url, "demo")
    for gpu, tps, gpus in [("Tesla T4", 1000.0, 1), ("Tesla T4", 1400.0, 1), ("NVIDIA L4", 6000.0, 2)]:
        trial = study.ask()
        trial.set_user_attr("worker", {"id": "a/1", "account": "a", "platform": "colab", "gpu": gpu})
        trial.set_user_attr("result", {"tokens_per_s": tps, "gpus": gpus, "train_tokens": 10_000})
        study.tell(trial, 1.0)
    running = study.ask()  # no result yet: not counted
    running.set_user_attr("worker", {"gpu": "NVIDIA A100"})
    spec_toml.write_text(spec_toml.read_text().replace("n_trials = 6", "n_trials = 36"))
    result = init(spec_toml, "--store", store_url, "--overwrite")
    assert result.exit_code == 0, result.output
    text = cost_lines(result)
    assert "on Tesla T4 (1,200 tok/s measured, 2 trials of this study)" in text
    assert f"{36 * 10_000 / 1200 / 3600:.2g} GPU-hours on Tesla T4" in text
    assert "on NVIDIA L4 (3,000 tok/s measured, 1 trial of this study)" in text  # per GPU: the trial ran on two
    assert "A100" not in text and "H100" not in text
    assert study.trials[-1].state == TrialState.RUNNING
