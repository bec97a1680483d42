"""`sweeper plot`: PNG files that decode to real pictures and one HTML page that parses and opens offline."""

from __future__ import annotations

import json
import math
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from test_cli import sweeper

from sweeper import plots
from sweeper.overview import MIN_FOR_IMPORTANCE
from sweeper.record import METRIC, RESULT, WORKER
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
    url = make_study(tmp_path, n_complete=MIN_FOR_IMPORTANCE, n_pruned=3)
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
                                          "importances: not drawn, 1 complete trial(s); it needs 10"]
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


def page_figures(path: Path) -> dict[str, dict]:
    """The plotly figures of a page as a browser gets them, by title: each Plotly.newPlot's data and layout."""
    decoder, figures = json.JSONDecoder(), {}
    for call in path.read_text(encoding="utf-8").split("Plotly.newPlot(")[1:]:
        rest = call.split(",", 1)[1].lstrip()  # after the div's id
        data, end = decoder.raw_decode(rest)
        layout, _ = decoder.raw_decode(rest[end:].lstrip()[1:].lstrip())
        figures[layout["title"]["text"]] = {"data": data, "layout": layout}
    return figures


def contrast_with_white(colour: str | tuple) -> float:
    """WCAG's contrast ratio of a colour (#rrggbb, rgb(r, g, b) or an RGBA tuple) against white."""
    from matplotlib.colors import to_rgb

    if isinstance(colour, str) and colour.startswith("rgb("):
        colour = tuple(float(v) / 255 for v in re.findall(r"[\d.]+", colour)[:3])
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
    return 1.05 / (0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2] + 0.05)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RATE_TICKS = ["5e-05", "1e-04", "2e-04", "5e-04", "1e-03"]  # make_study's 7 learning rates run 3e-05 to 1.1e-03


def test_importances_wait_for_as_many_complete_trials_as_the_report(tmp_path):
    url = make_study(tmp_path, n_complete=MIN_FOR_IMPORTANCE - 1)
    result = sweeper("plot", "--store", url, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"importances: not drawn, {MIN_FOR_IMPORTANCE - 1} complete trial(s); it needs {MIN_FOR_IMPORTANCE}"]


def test_the_learning_curves_colour_bar_reads_in_learning_rates(tmp_path):
    study, _ = load_study(make_study(tmp_path, n_complete=4, n_pruned=2), "demo")
    plt = pyplot()
    figure = plots._curves_png(plt, [t for t in study.get_trials() if t.intermediate_values])
    figure.canvas.draw()
    bar = figure.axes[1]
    assert [label.get_text() for label in bar.get_yticklabels()] == RATE_TICKS and bar.get_ylabel() == "learning rate"
    plt.close(figure)


def test_plots_html_draws_the_learning_curves_as_the_png_does(tmp_path):
    url = make_study(tmp_path, n_complete=4, n_pruned=2)  # and one running
    assert sweeper("plot", "--store", url, "--out", tmp_path / "out").exit_code == 0

    figures = page_figures(tmp_path / "out" / "plots.html")

    curves = figures["Eval loss at each eval point (lowest: #1, black; pruned: dashed)"]  # the PNG's title
    lines = [trace for trace in curves["data"] if trace["mode"] == "lines+markers"]
    assert len(lines) == 7 and [trace["line"]["dash"] for trace in lines].count("dash") == 2
    assert [trace["line"]["color"] for trace in lines].count("black") == 1 == (lines[-1]["line"]["color"] == "black")
    assert len({trace["line"]["color"] for trace in lines}) == 7  # one colour per learning rate
    bar = next(trace["marker"]["colorbar"] for trace in curves["data"] if trace.get("marker", {}).get("showscale"))
    assert bar["title"]["text"] == "learning rate" and bar["ticktext"] == RATE_TICKS
    assert (curves["layout"]["xaxis"]["title"]["text"], curves["layout"]["yaxis"]["title"]["text"]) == (
        "eval point", "eval loss")


def test_parallel_coordinates_draw_every_trial_visible_on_white(tmp_path):
    url = make_study(tmp_path, n_complete=6)
    assert sweeper("plot", "--store", url, "--out", tmp_path / "out").exit_code == 0

    parallel = page_figures(tmp_path / "out" / "plots.html")["Parallel Coordinate Plot"]
    colours = [trace["line"]["color"] for trace in parallel["data"] if trace["mode"] == "lines"]
    assert len(colours) == 6 and min(map(contrast_with_white, colours)) >= 3
    bar = next(trace["marker"] for trace in parallel["data"] if trace.get("marker", {}).get("showscale"))
    assert min(contrast_with_white(colour) for _, colour in bar["colorscale"]) >= 3

    import optuna.visualization.matplotlib as vis_mpl
    from matplotlib.collections import LineCollection

    plt = pyplot()
    study, _ = load_study(url, "demo")
    figure = plots._parallel_png(plt, vis_mpl.plot_parallel_coordinate(study, target_name=METRIC))
    lines = next(c for c in figure.axes[0].collections if isinstance(c, LineCollection))
    assert min(contrast_with_white(tuple(rgba)) for rgba in lines.to_rgba(lines.get_array())) >= 3
    plt.close(figure)


def test_the_objective_is_named_eval_loss_in_optunas_figures(tmp_path):
    url = make_study(tmp_path, n_complete=MIN_FOR_IMPORTANCE)
    assert sweeper("plot", "--store", url, "--out", tmp_path / "out").exit_code == 0

    figures = page_figures(tmp_path / "out" / "plots.html")

    parallel = figures["Parallel Coordinate Plot"]
    bar = next(trace["marker"]["colorbar"] for trace in parallel["data"] if trace.get("marker", {}).get("showscale"))
    assert bar["title"]["text"] == "eval_loss" and "eval loss" not in json.dumps(parallel)  # its axis too
    assert figures["Hyperparameter Importances"]["data"][0]["name"] == "eval_loss"
