"""`sweeper plot`: PNG files that decode to real pictures and one HTML page that parses and opens offline."""

from __future__ import annotations

import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from test_cli import sweeper

from sweeper.record import RESULT, WORKER
from sweeper.spec import load_spec
from sweeper.study import create_study, load_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["loss_vs_lr", "learning_curves", "parallel_coordinate", "importances"]


def make_study(folder: Path, n_complete: int, n_pruned: int = 0, url: str | None = None) -> str:
    """A sweep the way workers leave it (in a journal file in folder, or at url): a U-shaped loss in log learning
    rate, four evals a trial, pruned ones stopped at eval 2, one still running."""
    (folder / "sweep.toml").write_text(
        'study = "demo"\n[model]\nid = "m"\n[data]\nsource = "d.jsonl"\n[budget]\ntrain_tokens = 200_000\nevals = 4\n')
    url = url or f"journal://{folder / 'sweep.log'}"
    create_study(load_spec(folder / "sweep.toml"), url)
    study, _ = load_study(url, "demo")
    states = [TrialState.COMPLETE] * n_complete + [TrialState.PRUNED] * n_pruned + [TrialState.RUNNING]
    for i, state in enumerate(states):
        lr, batch = 3e-5 * (2e-3 / 3e-5) ** ((i * 0.37) % 1), [8, 16, 32][i % 3]
        final = 1.2 + 0.3 * (math.log10(lr) + 3.5) ** 2 + batch / 200
        evals = {k: final + 1.5 / k for k in range(1, 5)}
        evals = {k: v for k, v in evals.items() if k <= {TrialState.PRUNED: 2, TrialState.RUNNING: 1}.get(state, 4)}
        study.add_trial(optuna.trial.create_trial(
            state=state, value=evals[4] if state == TrialState.COMPLETE else None,
            params={"learning_rate": lr, "batch_size": batch},
            distributions={"learning_rate": FloatDistribution(3e-5, 2e-3, log=True),
                           "batch_size": CategoricalDistribution([8, 16, 32])},
            intermediate_values=evals,
            user_attrs={WORKER: {"id": "alice/0", "account": "alice", "platform": "kaggle", "gpu": "Tesla T4"},
                        RESULT: {"wall_time_s": 600.0}}))
    return url


class _Page(HTMLParser):
    """Collects what a browser would act on: the figures' divs and the scripts' sources."""

    def __init__(self) -> None:
        super().__init__()
        self.figures, self.script_sources, self.open_tags = 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.figures += "plotly-graph-div" in (attrs.get("class") or "")
        if tag == "script" and attrs.get("src"):
            self.script_sources.append(attrs["src"])
        if tag in ("html", "body", "div"):
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        if tag in ("html", "body", "div"):
            assert self.open_tags.pop() == tag


def decode_png(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def test_plot_writes_every_figure_as_a_png_and_one_html_page_that_opens_offline(tmp_path):
    url = make_study(tmp_path, n_complete=9, n_pruned=3)
    out = tmp_path / "figures" / "new"  # created, parents too
    result = sweeper("plot", "--store", url, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / f"{name}.png") for name in FIGURES] + [str(out / "plots.html")]
    assert result.stderr == ""
    for name in FIGURES:
        image = decode_png(out / f"{name}.png")
        assert image.shape[:2] == (550, 880)  # 8 x 5 inches at 110 dpi
        assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::7]}) > 20  # drawn on, not a blank page
    # Every batch size's points are there, in its own colour (matplotlib's tab10: blue, orange, green): a point
    # fills about 70 pixels, its legend entry as many; three complete trials of each.
    pixels = (decode_png(out / "loss_vs_lr.png")[..., :3] * 255).round().astype(int).reshape(-1, 3).tolist()
    for colour in ([31, 119, 180], [255, 127, 14], [44, 160, 44]):
        assert pixels.count(colour) > 180

    text = (out / "plots.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert page.figures == len(FIGURES) and page.open_tags == []
    assert page.script_sources == []  # plotly.js is inside the page: nothing to fetch from the internet
    assert text.count("Plotly.newPlot") == len(FIGURES) and 3e6 < len(text) < 8e6  # plotly.js carried once


def test_plot_with_too_few_trials_says_which_figures_are_left_out_and_writes_the_rest(tmp_path):
    url = make_study(tmp_path, n_complete=1, n_pruned=1)
    result = sweeper("plot", "--store", url, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(tmp_path / "out" / n) for n in
                                          ("loss_vs_lr.png", "learning_curves.png", "plots.html")]
    assert result.stderr.splitlines() == ["parallel_coordinate: not drawn, 1 complete trial(s); it needs 2",
                                          "importances: not drawn, 1 complete trial(s); it needs 5"]
    decode_png(tmp_path / "out" / "loss_vs_lr.png")


def test_plot_into_a_path_under_a_file_exits_2_in_one_line(tmp_path):
    url = make_study(tmp_path, n_complete=2)
    (tmp_path / "taken").write_text("a file")
    result = sweeper("plot", "--store", url, "--out", tmp_path / "taken" / "figures")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"Error: --out {tmp_path / 'taken' / 'figures'}: not a folder (a file is in the way)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys refuses new folders on Linux only")
def test_plot_into_a_folder_the_system_refuses_exits_1_in_one_line(tmp_path):
    url = make_study(tmp_path, n_complete=2)
    result = sweeper("plot", "--store", url, "--out", "/sys/sweeper-plots")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write /sys/sweeper-plots: ")


def test_plot_without_the_report_extra_names_the_pip_extra_in_one_line(tmp_path, monkeypatch):
    url = make_study(tmp_path, n_complete=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises ImportError
    result = sweeper("plot", "--store", url, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: matplotlib is not installed; it comes with the report extra: pip install 'sweeper-qlora[report]'"]
