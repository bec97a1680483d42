"""`sweeper plot`: a sweep's figures, as PNG files (matplotlib) and one HTML page (the same figures, in plotly).

matplotlib and plotly come with the `report` extra and are imported only here, when a plot is asked for: the
control plane stays light on a laptop. The HTML page carries plotly.js inside it (about 5 MB, once for every
figure) so it opens offline and can be mailed or moved on its own; "cdn" would need the internet to show
anything, and one file per figure would carry plotly.js once each.
"""

from __future__ import annotations

import importlib
import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from sweeper.configs import params_text
from sweeper.errors import SweeperError, UserError, first_line
from sweeper.overview import MIN_FOR_IMPORTANCE
from sweeper.record import METRIC, eval_loss_of, params_of

EXTRA = "pip install 'sweeper-qlora[report]'"
MIN_COMPLETE = {"parallel_coordinate": 2, "importances": MIN_FOR_IMPORTANCE}  # fewer would draw nothing, or noise
# Where on matplotlib's "Blues" the highest eval loss sits (the lowest: 1, darkest): 3:1 against white, WCAG's contrast
# for graphics. Optuna's parallel coordinates run from 0, white on white.
LIGHTEST_BLUE = 0.6


def report_extra(module: str) -> Any:
    """A package of the `report` extra, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SweeperError(f"{module} is not installed; it comes with the report extra: {EXTRA}") from None


def check_out(out: Path) -> None:
    """An output folder that is a file, or under one, is bad input, said before any work. (What stops the write
    later, permissions or a read-only or full disk, is a runtime failure.)"""
    if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
        raise UserError(f"--out {out}: not a folder (a file is in the way)")


def write_plots(study: optuna.Study, out: Path) -> tuple[list[Path], list[str]]:
    """Every figure the trials allow, into out (created): (files written, one line per figure left out and why)."""
    report_extra("plotly")
    matplotlib = report_extra("matplotlib")
    _write(lambda: out.mkdir(parents=True, exist_ok=True), out)
    matplotlib.use("Agg")  # no display: a notebook VM, CI, a server
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    with_loss = [t for t in trials
                 if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and eval_loss_of(t) is not None]
    curves = [t for t in trials if t.intermediate_values]

    def needs_complete(n: int) -> str | None:
        return None if len(complete) >= n else f"{len(complete)} complete trial(s); it needs {n}"

    def optunas(png: Any, html: Any) -> tuple[Any, Any]:
        return lambda: png(study, target_name=METRIC).figure, lambda: html(study, target_name=METRIC)

    # name: (why it is left out, or None; its PNG's matplotlib figure; its plotly figure for the HTML page)
    figures = {
        "loss_vs_lr": (
            "the space has no learning_rate" if with_loss and not any("learning_rate" in params_of(t) for t in with_loss)
            else None if len(with_loss) >= 2 else f"{len(with_loss)} finished trial(s) with an eval loss; it needs 2",
            lambda: _loss_vs_lr_png(plt, with_loss), lambda: _loss_vs_lr_html(with_loss)),
        "learning_curves": (None if curves else "no trial has reported an eval loss yet",
                            lambda: _curves_png(plt, curves), lambda: _curves_html(curves)),
        "parallel_coordinate": (needs_complete(MIN_COMPLETE["parallel_coordinate"]),
                                lambda: _parallel_png(plt, vis_mpl.plot_parallel_coordinate(study, target_name=METRIC)),
                                lambda: _parallel_html(plt, vis.plot_parallel_coordinate(study, target_name=METRIC))),
        "importances": (needs_complete(MIN_COMPLETE["importances"]),  # PED-ANOVA, as the report: no scikit-learn
                        *optunas(partial(vis_mpl.plot_param_importances, evaluator=PedAnovaImportanceEvaluator()),
                                 partial(vis.plot_param_importances, evaluator=PedAnovaImportanceEvaluator()))),
    }

    written, skipped, html_figures = [], [], []
    # rc_context: optuna.visualization.matplotlib switches the global style (ggplot); undo it on the way out
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is experimental; axis-limit chatter
        for name, (why, png, html) in figures.items():
            if why is not None:
                skipped.append(f"{name}: not drawn, {why}")
                continue
            try:
                figure, html_figure = png(), html()
            except (ValueError, RuntimeError) as e:  # Optuna's own refusals, e.g. importances of params that never vary
                skipped.append(f"{name}: not drawn, {first_line(e)}")
                continue
            path = out / f"{name}.png"
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            _write(lambda: figure.savefig(path, dpi=110), path)
            plt.close(figure)
            written.append(path)
            html_figures.append(html_figure)
    if html_figures:
        path = out / "plots.html"
        _write(lambda: path.write_text(_page(study.study_name, html_figures), encoding="utf-8"), path)
        written.append(path)
    return written, skipped


def _write(save: Any, path: Path) -> None:
    try:
        save()
    except OSError as e:
        raise SweeperError(f"cannot write {path}: {e.strerror or e}") from None


def _lowest(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The complete trial of the lowest eval loss (one run: `sweeper best` also weighs repeats)."""
    return min((t for t in trials if t.state == TrialState.COMPLETE and t.value is not None),
               key=lambda t: t.value, default=None)


def _by_batch(trials: list[FrozenTrial]) -> dict[Any, list[FrozenTrial]]:
    """The trials by effective batch size, smallest first (None: a space without batch_size)."""
    groups: dict[Any, list[FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(params_of(t).get("batch_size"), []).append(t)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] if isinstance(kv[0], (int, float)) else 0)))


def _loss_vs_lr_png(plt: Any, trials: list[FrozenTrial]) -> Any:
    figure, ax = plt.subplots()
    for color, (batch, group) in zip(plt.get_cmap("tab10").colors, _by_batch(trials).items()):
        for state, filled in ((TrialState.COMPLETE, True), (TrialState.PRUNED, False)):
            points = [(params_of(t)["learning_rate"], eval_loss_of(t)) for t in group
                      if t.state == state and "learning_rate" in params_of(t)]
            if points:
                x, y = zip(*points)
                label = f"batch {batch}" if batch is not None else "trials"
                ax.scatter(x, y, s=40, color=color if filled else "none", edgecolors=color,
                           label=label if filled else f"{label}, pruned (last eval)")
    if (lowest := _lowest(trials)) and "learning_rate" in params_of(lowest):
        ax.scatter([params_of(lowest)["learning_rate"]], [lowest.value], s=320, marker="*", facecolors="none",
                   edgecolors="black", linewidths=1.2, zorder=3,
                   label=f"lowest: #{lowest.number}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="eval loss", title="Eval loss vs learning rate, by effective batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def _loss_vs_lr_html(trials: list[FrozenTrial]) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    for batch, group in _by_batch(trials).items():
        group = [t for t in group if "learning_rate" in params_of(t)]
        figure.add_trace(go.Scatter(
            x=[params_of(t)["learning_rate"] for t in group], y=[eval_loss_of(t) for t in group], mode="markers",
            name=f"batch {batch}" if batch is not None else "trials",
            marker=dict(size=9, symbol=["circle" if t.state == TrialState.COMPLETE else "circle-open" for t in group]),
            text=[f"#{t.number} {t.state.name.lower()}" for t in group]))
    figure.update_layout(title="Eval loss vs learning rate, by effective batch size (open: pruned, last eval)",
                         xaxis=dict(type="log", title="learning rate"), yaxis=dict(title="eval loss"))
    return figure


def _by_rate(trials: list[FrozenTrial]) -> tuple[list[str], Any]:
    """Each trial's colour by its learning rate, log scale (viridis; grey without one), and the scale's norm (in
    log10 units; None where no trial has a learning rate): one colouring for the PNG and the HTML page."""
    import matplotlib.colors

    rates = [params_of(t).get("learning_rate") for t in trials]
    logs = [math.log10(r) if isinstance(r, (int, float)) and r > 0 else None for r in rates]
    known = [v for v in logs if v is not None]
    if not known:
        return ["grey"] * len(trials), None
    norm = matplotlib.colors.Normalize(min(known), max(known) + (len(set(known)) < 2))
    cmap = matplotlib.colormaps["viridis"]
    return [matplotlib.colors.to_hex(cmap(norm(v))) if v is not None else "grey" for v in logs], norm


def _rate_ticks(norm: Any) -> tuple[list[float], list[str]]:
    """Where the colour bar (log10 units) is labelled, and its labels in learning rates (5e-05, 1e-04, 2e-04): 1, 2
    and 5 of each power of ten in range, or every digit where those are fewer than 3."""
    lo, hi = 10 ** norm.vmin * (1 - 1e-9), 10 ** norm.vmax * (1 + 1e-9)
    for digits in ((1, 2, 5), range(1, 10)):
        rates = [d * 10.0 ** e for e in range(math.floor(norm.vmin), math.ceil(norm.vmax) + 1) for d in digits
                 if lo <= d * 10.0 ** e <= hi]
        if len(rates) >= 3:
            break
    return [math.log10(r) for r in rates], [f"{r:.0e}" for r in rates]


def _curves_title(lowest: FrozenTrial | None) -> str:
    return "Eval loss at each eval point" + (f" (lowest: #{lowest.number}, black; pruned: dashed)" if lowest else "")


def _curves_png(plt: Any, trials: list[FrozenTrial]) -> Any:
    """Every trial's eval loss at each eval point, coloured by learning rate; pruned dashed, the lowest in black."""
    figure, ax = plt.subplots()
    colours, norm = _by_rate(trials)
    lowest = _lowest(trials)
    for t, colour in zip(trials, colours):
        steps = sorted(t.intermediate_values)
        ax.plot(steps, [t.intermediate_values[s] for s in steps], marker=".", alpha=0.8,
                color="black" if t is lowest else colour, linewidth=2.5 if t is lowest else 1.2,
                linestyle="--" if t.state == TrialState.PRUNED else "-", zorder=3 if t is lowest else 2)
    if norm is not None:
        bar = figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax)
        ticks, labels = _rate_ticks(norm)
        bar.set_ticks(ticks, labels=labels)
        bar.set_label("learning rate")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="eval point", ylabel="eval loss", title=_curves_title(lowest))
    ax.grid(True, alpha=0.3)
    return figure


def _curves_html(trials: list[FrozenTrial]) -> Any:
    """The learning curves as _curves_png draws them, as a plotly figure: each trial's params on hover."""
    import plotly.graph_objects as go

    colours, norm = _by_rate(trials)
    lowest = _lowest(trials)
    figure = go.Figure()
    for t, colour in sorted(zip(trials, colours), key=lambda pair: pair[0] is lowest):  # the lowest drawn on top
        steps = sorted(t.intermediate_values)
        figure.add_trace(go.Scatter(
            x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines+markers", showlegend=False,
            name=f"#{t.number} {t.state.name.lower()}", text=[params_text(params_of(t))] * len(steps),
            line=dict(color="black" if t is lowest else colour, width=3 if t is lowest else 1.5,
                      dash="dash" if t.state == TrialState.PRUNED else "solid")))
    if norm is not None:  # the colour bar, on a trace with no point to draw
        ticks, labels = _rate_ticks(norm)
        figure.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
            marker=dict(colorscale="Viridis", cmin=norm.vmin, cmax=norm.vmax, color=[norm.vmin], showscale=True,
                        colorbar=dict(title="learning rate", tickvals=ticks, ticktext=labels))))
    figure.update_layout(title=_curves_title(lowest), xaxis=dict(title="eval point", dtick=1),
                         yaxis=dict(title="eval loss"))
    return figure


def _blue(plt: Any, where: float) -> Any:
    """The colour of an eval loss `where` of the way from the lowest (0, darkest) to the highest (1): blue on white."""
    return plt.get_cmap("Blues")(1 - (1 - LIGHTEST_BLUE) * where)


def _parallel_png(plt: Any, ax: Any) -> Any:
    """Optuna's parallel coordinates (matplotlib), every trial's line coloured so that it shows on white."""
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap

    for lines in ax.collections:
        if isinstance(lines, LineCollection):  # the trials' lines; the colour bar follows their map
            lines.set_cmap(ListedColormap(_blue(plt, np.linspace(0, 1, 256))))
    return ax.figure


def _parallel_html(plt: Any, figure: Any) -> Any:
    """Optuna's parallel coordinates (plotly), every trial's line coloured so that it shows on white: a line's first
    point is its eval loss, scaled from the lowest (0) to the highest (1)."""
    from matplotlib.colors import to_hex

    for trace in figure.data:
        if trace.mode == "lines":
            trace.line.color = to_hex(_blue(plt, trace.y[0]))
        elif trace.marker.showscale:  # the colour bar
            trace.marker.colorscale = [[k / 10, to_hex(_blue(plt, k / 10))] for k in range(11)]
            trace.marker.reversescale = False
    return figure


def _page(study_name: str, figures: list[Any]) -> str:
    from html import escape

    parts = [f.to_html(full_html=False, include_plotlyjs=i == 0) for i, f in enumerate(figures)]
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{escape(study_name)}: sweeper plots</title>"
            f"</head><body>\n<h1>{escape(study_name)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n")
