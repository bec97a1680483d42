"""The trial table: its fast path draws exactly what a rich row per trial draws, and data is never markup."""

from __future__ import annotations

import io

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from rich.console import Console
from rich.text import Text

from sweeper.report import render_table, trial_rows
from sweeper.spec import load_spec
from sweeper.study import create_study, load_study

# (state, objective, eval losses, gpu, account, checkpoint): long paths to crop, names with spaces
# that wrap when narrowed, wide characters, and values that look like rich markup or emoji codes.
TRIALS = [
    (TrialState.COMPLETE, 1.5, [2.0, 1.5], "Tesla T4", "alice", "/content/drive/MyDrive/sweeps/demo/trial-0000"),
    (TrialState.COMPLETE, 1.2, [1.6, 1.2], "NVIDIA A100-SXM4-40GB", "[lab]", "/ckpt/[bold]x/:smile:/trial-0001"),
    (TrialState.PRUNED, None, [2.5, 2.4], "Tesla P100-PCIE-16GB", "研究室", "/content/drive/MyDrive/sweeps/demo/trial-0002"),
    (TrialState.FAIL, None, [], "NVIDIA L4", "bob smith", ""),
    (TrialState.RUNNING, None, [1.9], "Tesla T4", "carol", "/kaggle/working/ckpt/trial-0004"),
    (TrialState.WAITING, None, [], None, None, None),
]


@pytest.fixture(scope="module")
def study_and_spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    (folder / "sweep.toml").write_text(
        'study = "demo"\n[model]\nid = "m"\n[data]\nsource = "d.jsonl"\n[budget]\ntrain_tokens = 200_000\n')
    url = f"journal://{folder / 'sweep.log'}"
    create_study(load_spec(folder / "sweep.toml"), url)
    study, spec = load_study(url, "demo")
    for i, (state, value, evals, gpu, account, checkpoint) in enumerate(TRIALS):
        attrs = {} if gpu is None else {
            "worker": {"id": f"{account}/0", "account": account, "platform": "colab", "gpu": gpu},
            "result": {"steps": 10 * i, "wall_time_s": 100.0 * i + 0.5, "tokens_per_s": 1234.5, "checkpoint": checkpoint}}
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value,
            params={"learning_rate": 10 ** (-4.5 + i / 4), "batch_size": [8, 16, 32][i % 3]},
            distributions={"learning_rate": FloatDistribution(3e-5, 2e-3, log=True),
                           "batch_size": CategoricalDistribution([8, 16, 32])},
            intermediate_values={k + 1: v for k, v in enumerate(evals)}, user_attrs=attrs))
    return study, spec


def draw(study, spec, rows, width: int, color: bool, fast: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=color, color_system="truecolor" if color else None)
    render_table(study, spec, rows, console, fast=fast)
    return out.getvalue()


def styled_chars(ansi: str) -> list[tuple[str, object]]:
    """Each character with its style: equal for two outputs a terminal shows alike."""
    return [(ch, seg.style) for seg in Text.from_ansi(ansi).render(Console(width=1000)) for ch in seg.text]


@pytest.mark.parametrize("width", [220, 160, 130, 110, 90, 60])
@pytest.mark.parametrize("n_rows", [1, 2, 6])
def test_fast_table_draws_exactly_what_a_rich_row_per_trial_draws(study_and_spec, width, n_rows):
    study, spec = study_and_spec
    rows = trial_rows(study)[:n_rows]
    assert draw(study, spec, rows, width, False, fast=True) == draw(study, spec, rows, width, False, fast=False)
    fast, slow = draw(study, spec, rows, width, True, fast=True), draw(study, spec, rows, width, True, fast=False)
    assert styled_chars(fast) == styled_chars(slow)


def test_table_shows_markup_and_emoji_codes_in_data_as_written(study_and_spec):
    study, spec = study_and_spec
    text = draw(study, spec, trial_rows(study), 220, False, fast=True)
    assert "[lab]" in text and "/ckpt/[bold]x/:smile:/trial-0001" in text and "研究室" in text


def test_table_crops_a_long_path_when_narrow(study_and_spec):
    study, spec = study_and_spec
    text = draw(study, spec, trial_rows(study), 130, False, fast=True)
    assert "/content/drive/MyDrive/sweeps/demo/trial-0000" not in text and "…" in text
    assert max(map(len, text.splitlines())) <= 130


def test_table_of_a_study_without_trials_is_the_header_alone(study_and_spec):
    study, spec = study_and_spec
    text = draw(study, spec, [], 160, False, fast=True)
    assert "no trials" in text and "learning_rate" in text
