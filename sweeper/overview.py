"""The default `sweeper report` view: where a sweep stands, read at a glance in any terminal from 80 columns up.

Progress, the leaderboard, the running trials, best eval loss by learning rate x batch size, importances and the
warnings a person acts on; `watch` redraws it in place. Every cell is rich Text, never markup; a column that does
not fit is left out whole, never cropped (checkpoint paths are for `--all`, `--json`, `--csv`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import optuna
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from rich import box
from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Column, Table
from rich.text import Text

from sweeper.configs import ConfigGroup, group_configs
from sweeper.leases import grace_s, lease_note, not_retried, silence, stopped_workers
from sweeper.record import STALE_REASON, fail_reason, lease_of, row_info, worker_of
from sweeper.report import fmt, gpu_hours, printable, trial_rows
from sweeper.spec import SweepSpec
from sweeper.storage import Store, gc_paused

MIN_FOR_IMPORTANCE = 10  # complete trials before importances mean anything
MAX_FOR_IMPORTANCE = 1000  # beyond, an even sample: the estimate barely moves, and its cost grows with every trial
LR_BINS = 5
NOTE_MIN = 24  # cells a note column keeps before a table leaves out a column instead
EDGE = 0.1  # a best value in the outer tenth of a log/linear range is "on the edge"
STATES = [("complete", TrialState.COMPLETE, "green"), ("pruned", TrialState.PRUNED, "yellow"),
          ("failed", TrialState.FAIL, "red"), ("running", TrialState.RUNNING, "cyan"),
          ("queued", TrialState.WAITING, "bright_black")]


def look(study: optuna.Study, store: Store, spec: SweepSpec, width: int, top: int = 10, live: bool = False) -> Group:
    """Read the store once, and return the view of what it holds now (live: for `watch`)."""
    grace = grace_s(*store.lease_timing(spec.heartbeat_s))
    with gc_paused():  # every object made here lives until the view is drawn: a collection would be wasted work
        trials = study.get_trials(deepcopy=False)
        rows = trial_rows(study, store, grace, trials)
        return view(study, spec, trials, rows, grace, stopped_workers(study), width, top, live=live)


def view(study: optuna.Study, spec: SweepSpec, trials: list[FrozenTrial], rows: list[dict[str, Any]], grace: float,
         stopped: list[str], width: int, top: int = 10, now: float | None = None, live: bool = False) -> Group:
    """The whole view; rows: report.trial_rows of the same trials (their notes); stopped: leases.stopped_workers.
    A warning is one line, for the terminal to wrap (print it with crop=False): a path in it copies whole; live
    (redrawn in place, where every line must fit) wraps it at the width."""
    now = time.time() if now is None else now
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["eval_loss"] is not None]
    groups = group_configs(rows)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    parts: list[RenderableType] = [*_progress(study, spec, trials, rows, groups, running, grace, stopped, width, now)]
    if groups:
        parts.append(_fit(_leaderboard(spec, groups, rows, top), ["note", "account", "GPU", "wall"], width))
    if running:
        parts.append(_fit(_running_table(spec, running, grace, now), ["GPU", "platform", "account"], width))
    if (grid := _lr_batch_table(spec, complete)) is not None:
        parts.append(grid)
    parts.append(_importances(spec, trials, len(complete)))
    for line, style in warning_lines(spec, trials, groups, running, grace, stopped, now):
        parts.append(Text(printable(line), style=style) if live else
                     Text(printable(line), style=style, no_wrap=True, overflow="ignore"))
    return Group(*parts)


def watch(console: Console, render: Callable[[], RenderableType], interval_s: float,
          sleep: Callable[[float], None] | None = None) -> None:
    """Redraw render() in place every interval_s until Ctrl-C, which leaves the last view on screen."""
    sleep = sleep or time.sleep  # looked up here, so that a test may replace time.sleep
    try:
        with Live(render(), console=console, auto_refresh=False) as live:
            while True:
                sleep(interval_s)
                live.update(render(), refresh=True)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------------------------
# Progress


def _progress(study, spec, trials, rows, groups, running, grace, stopped, width, now) -> list[Text]:
    """The study, its best config, GPU-hours; a bar of the budget by state; the workers."""
    by_state = Counter(t.state for t in trials)
    counts = {name: by_state[state] for name, state, _ in STATES}
    finished = counts["complete"] + counts["pruned"]
    best_text = f"best #{groups[0].best_trial} {groups[0].best:.4f}" if groups else "no complete trial yet"
    head = Text(f"{study.study_name}: {finished} of {spec.n_trials} finished · {best_text} · "
                f"{gpu_hours(rows):.2f} GPU-hours", style="bold")
    bar, total, bar_width = Text(), max(spec.n_trials, len(trials), 1), max(10, min(width, 100) - 2)
    for name, _, style in STATES:  # queued last: what the budget still holds
        bar.append("█" * round(bar_width * counts[name] / total), style=style)
    bar.truncate(bar_width)  # (rounding up)
    bar.append("░" * (bar_width - bar.cell_len), style="bright_black")
    states = Text("  ").join(Text.assemble((f"{n} {counts[n]}", s)) for n, _, s in STATES)
    alive = {lease_of(t).get("worker") or worker_of(t).get("id") or "?" for t in running if not _silent(t, grace, now)}
    silent = sum(1 for t in running if _silent(t, grace, now))
    workers = Text(f"workers: {len(alive)} alive" + (f", {silent} silent" if silent else "")
                   + (f", {len(stopped)} stopped" if stopped else ""))
    return [head, bar, states, workers]


def _lease_age(trial: FrozenTrial, now: float) -> float | None:
    at = lease_of(trial).get("at")
    return max(0.0, now - at) if isinstance(at, (int, float)) else None


def _silent(trial: FrozenTrial, grace: float, now: float) -> bool:
    age = _lease_age(trial, now)
    return age is not None and age > grace


# ---------------------------------------------------------------------------------------------
# Tables


def _fit(table: Table, optional: list[str], width: int) -> Table:
    """Leave out the fewest of `optional`'s columns (from its end) for the table to fit the width without cropping
    a cell; a note column may wrap, down to NOTE_MIN cells, and goes where it is empty."""
    def natural(column: Column) -> int:
        cells = [cell_len(cell.plain) for cell in column.cells]
        return min(NOTE_MIN, max(cells, default=0)) if column.header == "note" else max([cell_len(column.header), *cells])

    widths = {column.header: natural(column) for column in table.columns}
    left_out, next_out = {"note"} if widths.get("note") == 0 else set(), list(reversed(optional))
    while next_out:
        kept = [w for h, w in widths.items() if h not in left_out]
        if sum(kept) + 3 * (len(kept) - 1) + 2 <= width:  # a SIMPLE_HEAD box: 1 + 1 + 1 between columns, 1 at each edge
            break
        left_out.add(next_out.pop(0))
    kept = [column for column in table.columns if column.header not in left_out]
    fitted = _table(str(table.title), [(str(column.header), column.justify == "right") for column in kept])
    for row, *cells in zip(table.rows, *(column.cells for column in kept)):
        fitted.add_row(*cells, style=row.style)
    return fitted


def _table(title: str, columns: list[tuple[str, bool]]) -> Table:
    """A compact table of the columns (header, right-justified); only a note wraps."""
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, right in columns:
        table.add_column(header, justify="right" if right else "left", no_wrap=header != "note")
    return table


def _add_row(table: Table, cells: dict[str, str], style: str | None = None) -> None:
    table.add_row(*(Text(printable(cells.get(str(c.header), ""))) for c in table.columns), style=style)


def _leaderboard(spec: SweepSpec, groups: list[ConfigGroup], rows: list[dict[str, Any]], top: int) -> Table:
    """The top configs by configs.RULE; where any was repeated, each config's mean, spread and runs."""
    repeated = any(g.n > 1 for g in groups)
    columns = [("#", True), *((name, True) for name in spec.space), ("eval loss", True),
               *((("±", True), ("runs", True)) if repeated else ()), ("GPU", False), ("account", False),
               ("wall", True), ("note", False)]
    how = "mean eval loss + its standard error" if repeated else "eval loss"
    table = _table(f"leaderboard: top {min(top, len(groups))} of {len(groups)} configs, by {how}", columns)
    for i, g in enumerate(groups[:top]):
        r = rows[g.best_trial]
        got = row_info(r)
        wall = got.get("wall_time_s")
        _add_row(table, {"#": str(g.best_trial), **{n: fmt(g.params.get(n)) for n in spec.space},
                         "eval loss": f"{g.mean:.4f}", "±": "" if g.std is None else f"{g.std:.4f}",
                         "runs": str(g.n) + (f" +{g.pending}" if g.pending else ""), "GPU": fmt(got.get("gpu")),
                         "account": fmt(got.get("account")), "wall": silence(wall) if wall else "",
                         "note": r["note"]}, style="bold green" if i == 0 else None)
    return table


def _running_table(spec: SweepSpec, running: list[FrozenTrial], grace: float, now: float) -> Table:
    columns = [("#", True), ("worker", False), ("account", False), ("platform", False), ("GPU", False),
               ("step", True), ("eval loss", True), ("lease", True)]
    table = _table(f"running: {len(running)}", columns)
    for t in running:
        lease, worker = lease_of(t), worker_of(t)
        step, total = lease.get("step"), lease.get("total_steps")
        last = max(t.intermediate_values, default=None)
        if step is not None:
            progress = f"{step}/{total if total is not None else '?'}"
        else:  # a worker from before leases carried the step: which eval it reached
            progress = f"eval {last}/{spec.budget.evals}" if last is not None else "?"
        age = _lease_age(t, now)
        _add_row(table, {"#": str(t.number), "worker": str(lease.get("worker") or worker.get("id") or "?"),
                         "account": fmt(lease.get("account") or worker.get("account")),
                         "platform": fmt(lease.get("platform") or worker.get("platform")),
                         "GPU": fmt(worker.get("gpu")), "step": progress,
                         "eval loss": "" if last is None else f"{t.intermediate_values[last]:.4f}",
                         "lease": "?" if age is None else silence(age)},
                 style="red" if age is not None and age > grace else None)
    return table


def _lr_batch_table(spec: SweepSpec, complete: list[dict[str, Any]]) -> Table | None:
    """Best eval loss of the complete trials by learning-rate bin (log-spaced over the range) and batch size."""
    lr, batch = spec.space.get("learning_rate"), spec.space.get("batch_size")
    if lr is None or not complete:
        return None
    if lr.choices is not None:
        bins = [(v, v, fmt(v)) for v in sorted(lr.choices)]
    else:
        lo, hi = float(lr.low), float(lr.high)
        edges = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * k / LR_BINS) for k in range(LR_BINS + 1)]
        bins = [(a, b, f"{a:.2g}–{b:.2g}") for a, b in zip(edges, edges[1:])]
    if batch is None:
        sizes = [None]
    elif batch.choices is not None:
        sizes = sorted(batch.choices)
    else:  # an integer range: the sizes run so far, if few
        sizes = sorted({r["params"].get("batch_size") for r in complete} - {None})
    if len(sizes) > 8:
        return None
    best: dict[tuple[int, Any], float] = {}
    counts = [0] * len(bins)
    for r in complete:
        value = r["params"].get("learning_rate")
        if value is None:
            continue
        k = next((i for i, (_, b, _) in enumerate(bins) if value <= b * (1 + 1e-9)), len(bins) - 1)
        key = (k, r["params"].get("batch_size"))
        best[key] = min(best.get(key, math.inf), r["eval_loss"])
        counts[k] += 1
    if not best:
        return None
    overall = min(best.values())
    table = Table(title="best eval loss: learning rate x batch size", title_justify="left", title_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("learning rate", no_wrap=True)
    for size in sizes:
        table.add_column("all" if size is None else f"batch {size}", justify="right", no_wrap=True)
    table.add_column("trials", justify="right", no_wrap=True)
    for k, (_, _, label) in enumerate(bins):
        cells = [Text(f"{best[(k, s)]:.4f}", style="bold green" if best[(k, s)] == overall else "")
                 if (k, s) in best else Text("·", style="bright_black") for s in sizes]
        table.add_row(Text(label), *cells, Text(str(counts[k])))
    return table


# ---------------------------------------------------------------------------------------------
# Importances and warnings


class _LoadedTrials:
    """The study as Optuna's importance evaluators read it (get_trials, directions), over trials already
    loaded: on an RDB store every get_trials loads each trial again (about 2 s at 5,000)."""

    directions = [StudyDirection.MINIMIZE]

    def __init__(self, trials: list[FrozenTrial]):
        self._trials = trials

    def get_trials(self, deepcopy: bool = False, states: Any = None) -> list[FrozenTrial]:
        return [t for t in self._trials if states is None or t.state in states]

    def _is_multi_objective(self) -> bool:
        return False


def _importances(spec: SweepSpec, trials: list[FrozenTrial], n_complete: int) -> Text:
    """Optuna's PED-ANOVA (its default evaluator, and needs no scikit-learn), on at most MAX_FOR_IMPORTANCE complete trials."""
    if len(spec.space) < 2:
        return Text("importances: one param in the space", style="bright_black")
    if n_complete < MIN_FOR_IMPORTANCE:
        return Text(f"importances: after {MIN_FOR_IMPORTANCE} complete trials ({n_complete} so far)",
                    style="bright_black")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    complete = complete[::math.ceil(len(complete) / MAX_FOR_IMPORTANCE)]
    names = [n for n in spec.space if any(n in t.params for t in complete)]
    with warnings.catch_warnings():  # a UserWarning where every trial ties: the scores say it (all equal)
        warnings.simplefilter("ignore", UserWarning)
        scores = get_param_importances(_LoadedTrials(complete), evaluator=PedAnovaImportanceEvaluator(), params=names)
    sampled = f", {len(complete)} of {n_complete} trials" if len(complete) < n_complete else ""
    text = Text(f"importance (PED-ANOVA{sampled}): ", style="bold")
    return text.append("  ".join(f"{name} {score:.2f}" for name, score in scores.items()), style="")


def warning_lines(spec: SweepSpec, trials: list[FrozenTrial], groups: list[ConfigGroup], running: list[FrozenTrial],
             grace: float, stopped: list[str], now: float) -> list[tuple[str, str]]:
    """(line, style) for what a person should act on: silent and stopped workers, a best config on the edge of the
    range or within its repeats' noise of the next, failed trials not retried."""
    lines = [(f"worker {lease_of(t).get('worker', '?')} is silent: trial #{t.number}'s {lease_note(t, grace, now)}",
              "red") for t in running if _silent(t, grace, now)]
    lines += [(line, "red") for line in stopped]
    if sum(g.n for g in groups) >= 3:
        for name, p in spec.space.items():
            value = groups[0].params.get(name)
            if p.low is None or p.high is None or not isinstance(value, (int, float)):
                continue
            scale = math.log if p.log else float
            where = (scale(value) - scale(p.low)) / ((scale(p.high) - scale(p.low)) or 1)
            if where <= EDGE or where >= 1 - EDGE:
                side = "low" if where <= EDGE else "high"
                lines.append((f"the best {name}, {fmt(value)}, is at the {side} edge of the range "
                              f"{fmt(p.low)}..{fmt(p.high)}: widen the range (sweeper init --overwrite)", "yellow"))
    for g, after in zip(groups[:3], groups[1:4]):  # the order at the top is what `sweeper best` acts on
        spread, gap = max(g.std or 0, after.std or 0), abs(after.mean - g.mean)
        if spread > gap:
            lines.append((f"the runs of #{g.best_trial}'s config disagree: spread {spread:.4f}, more than the "
                          f"{gap:.4f} between it and #{after.best_trial}'s; their order is noise: "
                          "sweeper enqueue --repeat 3 --top 3", "yellow"))
    if failed := not_retried(trials):
        last, who = failed[-1], worker_of(failed[-1])
        where = ", ".join(filter(None, (who.get("account"), who.get("gpu"))))
        reason = fail_reason(last) or last.user_attrs.get(STALE_REASON) or "no reason recorded"
        lines.append((f"{len(failed)} failed trial{'s' * (len(failed) > 1)} not retried; the latest, #{last.number}"
                      + (f" ({where})" if where else "") + f": {reason}. Run sweeper retry --failed", "yellow"))
    return lines

