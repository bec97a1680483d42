"""`sweeper plot`: a sweep's figures, as PNG files (matplotlib) and one HTML page (Optuna's plotly figures).

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

from sweeper.errors import SweeperError, UserError, first_line
from sweeper.record import eval_loss_of, params_of

EXTRA = "pip install 'sweeper-qlora[report]'"
MIN_COMPLETE = {"parallel_coordinate": 2, "importances": 5}  # fewer would draw nothing, or noise


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
        return lambda: png(study, target_name="eval loss").figure, lambda: html(study, target_name="eval loss")

    # name: (why it is left out, or None; its PNG's matplotlib figure; its plotly figure for the HTML page)
    figures = {
        "loss_vs_lr": (
            "the space has no learning_rate" if with_loss and not any("learning_rate" in params_of(t) for t in with_loss)
            else None if len(with_loss) >= 2 else f"{len(with_loss)} finished trial(s) with an eval loss; it needs 2",
            lambda: _loss_vs_lr_png(plt, with_loss), lambda: _loss_vs_lr_html(with_loss)),
        "learning_curves": (None if curves else "no trial has reported an eval loss yet",
                            lambda: _curves_png(plt, curves), lambda: vis.plot_intermediate_values(study)),
        "parallel_coordinate": (needs_complete(MIN_COMPLETE["parallel_coordinate"]),
                                *optunas(vis_mpl.plot_parallel_coordinate, vis.plot_parallel_coordinate)),
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


def _curves_png(plt: Any, trials: list[FrozenTrial]) -> Any:
    """Every trial's eval loss at each eval point, coloured by learning rate; pruned dashed, the lowest in black."""
    import matplotlib.colors

    figure, ax = plt.subplots()
    rates = [params_of(t).get("learning_rate") for t in trials]
    logs = [math.log10(r) for r in rates if isinstance(r, (int, float)) and r > 0]
    norm = matplotlib.colors.Normalize(min(logs, default=0), max(logs, default=1) + (len(set(logs)) < 2))
    cmap = plt.get_cmap("viridis")
    lowest = _lowest(trials)
    for t, rate in zip(trials, rates):
        steps = sorted(t.intermediate_values)
        color = cmap(norm(math.log10(rate))) if isinstance(rate, (int, float)) and rate > 0 else "grey"
        ax.plot(steps, [t.intermediate_values[s] for s in steps], marker=".", alpha=0.8,
                color="black" if t is lowest else color, linewidth=2.5 if t is lowest else 1.2,
                linestyle="--" if t.state == TrialState.PRUNED else "-", zorder=3 if t is lowest else 2)
    if logs:
        bar = figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
        bar.set_label("log10 learning rate")
    ax.xaxis.get_major_locator().set_params(integer=True)
    title = "Eval loss at each eval point" + (f" (lowest: #{lowest.number}, black; pruned: dashed)" if lowest else "")
    ax.set(xlabel="eval point", ylabel="eval loss", title=title)
    ax.grid(True, alpha=0.3)
    return figure


def _page(study_name: str, figures: list[Any]) -> str:
    from html import escape

    parts = [f.to_html(full_html=False, include_plotlyjs=i == 0) for i, f in enumerate(figures)]
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{escape(study_name)}: sweeper plots</title>"
            f"</head><body>\n<h1>{escape(study_name)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n")
