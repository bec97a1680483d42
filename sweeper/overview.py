"""The default `sweeper report` view: where a sweep stands, read at a glance in any terminal from 80 columns up.

Progress, the leaderboard, the running trials and their workers' machines, best eval loss by learning rate x batch
size, importances and the warnings a person acts on; `watch` redraws it in place. Every cell is rich Text, never
markup; a column that does not fit is left out whole, never cropped (checkpoint paths are for `--all`, `--json`,
`--csv`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from datetime import datetime
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

from sweeper.configs import ConfigGroup, best_text, group_configs, row_diverged, value_text
from sweeper.leases import grace_s, lease_note, not_retried, silence, stopped_workers
from sweeper.record import STALE_REASON, cards, diverged_of, fail_reason, lease_of, row_info, worker_of
from sweeper.report import budget, gpu_hours, printable, trial_rows
from sweeper.spec import SweepSpec
from sweeper.storage import Store, gc_paused, redact

MIN_FOR_IMPORTANCE = 10  # complete trials before importances mean anything
MAX_FOR_IMPORTANCE = 1000  # beyond, an even sample: the estimate barely moves, and its cost grows with every trial
LR_BINS = 5
NOTE_MIN = 24  # cells a note column keeps before a table leaves out a column instead
EDGE = 0.1  # a best value in the outer tenth of a log/linear range is "on the edge"
# The budget's bar: a glyph per state, so that it reads without colour (piped, NO_COLOR), and a colour.
# diverged: told PRUNED (sweeper/record.py), shown apart from the pruner's; left: the places no trial holds yet.
STATES = {"complete": ("█", "green"), "pruned": ("▓", "yellow"), "diverged": ("×", "magenta"),
          "running": ("▒", "cyan"), "queued": ("░", "blue"), "left": ("·", "bright_black")}
DIVERGED_NEAR = 2.0  # a diverged learning rate up to this many times the best config's is next to it


def look(study: optuna.Study, store: Store, spec: SweepSpec, width: int, top: int = 10, live: bool = False) -> Group:
    """Read the store once, and return the view of what it holds now (live: for `watch`)."""
    grace = grace_s(*store.lease_timing(spec.heartbeat_s))
    with gc_paused():  # every object made here lives until the view is drawn: a collection would be wasted work
        trials = study.get_trials(deepcopy=False)
        rows = trial_rows(study, store, grace, trials)
        shown = view(study, spec, trials, rows, grace, stopped_workers(study), width, top, live=live,
                     machines=cards(study.user_attrs))
    if not trials:  # one line, like a warning: the commands in it copy whole
        step = printable(next_step(study.study_name, store.url))
        shown.renderables.append(Text(step, style="yellow") if live else
                                 Text(step, style="yellow", no_wrap=True, overflow="ignore"))
    if live:  # redrawn in place: when this was read
        shown.renderables.append(Text(f"read at {datetime.fromtimestamp(time.time()):%H:%M:%S}; Ctrl-C leaves",
                                      style="bright_black"))
    return shown


def next_step(study_name: str, url: str) -> str:
    """What to do with a study that has no trial yet."""
    where = f"--store {redact(url)} --study {study_name}"
    return (f"no trial yet: start a worker (sweeper worker {where}, or a runner notebook: sweeper notebook), "
            f"after queueing points if you want them first (sweeper enqueue {where} --grid)")


def view(study: optuna.Study, spec: SweepSpec, trials: list[FrozenTrial], rows: list[dict[str, Any]], grace: float,
         stopped: list[str], width: int, top: int = 10, now: float | None = None, live: bool = False,
         machines: dict[str, dict[str, Any]] | None = None) -> Group:
    """The whole view; rows: report.trial_rows of the same trials (their notes); stopped: leases.stopped_workers;
    machines: record.cards of the study's user attrs.
    A warning is one line, for the terminal to wrap (print it with crop=False): a path in it copies whole; live
    (redrawn in place, where every line must fit) wraps it at the width."""
    now = time.time() if now is None else now
    n_complete = sum(r["state"] == "COMPLETE" and r["eval_loss"] is not None for r in rows)
    groups = group_configs(rows)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    parts: list[RenderableType] = [*_progress(study, spec, rows, groups, running, grace, stopped, width, now)]
    if groups:
        parts.append(_fit(_leaderboard(spec, groups, rows, top), ["note", "account", "GPU", "wall"], width))
    if running:
        parts.append(_fit(_running_table(spec, running, grace, now), ["GPU", "platform", "account"], width))
        if (table := _machines_table(running, machines or {})) is not None:
            parts.append(_fit(table, ["GPU", "fused", "micro-batch"], width))
    parts += _lr_batch_table(spec, rows, width)
    parts.append(_importances(spec, trials, n_complete))
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


def _progress(study, spec, rows, groups, running, grace, stopped, width, now) -> list[Text]:
    """The study and its best config; a bar of the budget by state (report.budget: its figures add up to n_trials)
    with its legend; failed trials and any queued past the budget, apart; the workers and the GPU-hours used."""
    counts = budget(rows, spec.n_trials)
    finished = counts["complete"] + counts["pruned"] + counts["diverged"]
    head = [f"{study.study_name}: {finished} of {spec.n_trials} finished", best_text(groups)]
    if cell_len(" · ".join(head)) <= width:  # else the best config on a line of its own, never broken
        head = [" · ".join(head)]
    shown = [name for name in STATES if name != "diverged" or counts[name]]  # (most sweeps never diverge)
    bar, total, bar_width = Text(), max(sum(counts[name] for name in STATES), 1), max(10, min(width, 100) - 2)
    done = 0
    for name in shown:  # each state's cells from where the last ended: they add up to the bar's width
        glyph, style = STATES[name]
        start, done = round(bar_width * done / total), done + counts[name]
        bar.append(glyph * (round(bar_width * done / total) - start), style=style)
    legend = Text("  ").join(Text(f"{STATES[name][0]} {name} {counts[name]}", style=STATES[name][1]) for name in shown)
    lines = [*(Text(line, style="bold") for line in head), bar, legend]
    if counts["failed"]:
        lines.append(Text(f"failed {counts['failed']}, outside the budget", style="red"))
    if counts["beyond"]:
        lines.append(Text(f"queued {counts['beyond']} beyond the budget: they run only if n_trials is raised",
                          style="yellow"))
    alive = {_worker_id(t) for t in running if not _silent(t, grace, now)}
    silent = sum(1 for t in running if _silent(t, grace, now))
    lines.append(Text(f"workers: {len(alive)} alive" + (f", {silent} silent" if silent else "")
                      + (f", {len(stopped)} stopped" if stopped else "") + f" · {gpu_hours(rows):.2f} GPU-hours"))
    return lines


def _worker_id(trial: FrozenTrial) -> str:
    return lease_of(trial).get("worker") or worker_of(trial).get("id") or "?"


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
        _add_row(table, {"#": str(g.best_trial), **{n: value_text(g.params.get(n)) for n in spec.space},
                         "eval loss": f"{g.mean:.4f}", "±": "" if g.std is None else f"{g.std:.4f}",
                         "runs": str(g.n) + (f" +{g.pending}" if g.pending else ""),
                         "GPU": value_text(got.get("gpu")),
                         "account": value_text(got.get("account")), "wall": silence(wall) if wall else "",
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
        _add_row(table, {"#": str(t.number), "worker": _worker_id(t),
                         "account": value_text(lease.get("account") or worker.get("account")),
                         "platform": value_text(lease.get("platform") or worker.get("platform")),
                         "GPU": value_text(worker.get("gpu")), "step": progress,
                         "eval loss": "" if last is None else f"{t.intermediate_values[last]:.4f}",
                         "lease": "?" if age is None else silence(age)},
                 style="red" if age is not None and age > grace else None)
    return table


def _machines_table(running: list[FrozenTrial], machines: dict[str, dict[str, Any]]) -> Table | None:
    """The machine card (runner/doctor.py's preflight) of each worker running a trial: what its GPU can do, and what
    the preflight chose for it; None where no such worker wrote one (a worker from before cards)."""
    shown = [(worker, machines[worker]) for worker in dict.fromkeys(map(_worker_id, running)) if worker in machines]
    if not shown:
        return None
    columns = [("worker", False), ("GPU", False), ("precision", False), ("micro-batch", True), ("fused", False),
               ("preflight", False)]
    table = _table(f"machines: {len(shown)}", columns)
    for worker, card in shown:
        checks = card.get("checks") or []
        passed = sum(1 for check in checks if check.get("status") == "pass")
        capability = f" ({card['capability']})" if card.get("capability") else ""
        _add_row(table, {"worker": worker, "GPU": f"{card.get('gpu', '?')}{capability}",
                         "precision": value_text(card.get("precision")),
                         "micro-batch": value_text(card.get("micro_batch")),
                         "fused": "yes" if card.get("fused") else "no",
                         "preflight": f"{'pass' if card.get('ok') else 'fail'} {passed}/{len(checks)} in "
                                      f"{silence(card.get('seconds') or 0)}"})
    return table


def _lr_batch_table(spec: SweepSpec, rows: list[dict[str, Any]], width: int) -> list[RenderableType]:
    """Best eval loss of the complete trials by learning-rate bin (log-spaced over the range) and batch size; where
    none completed, the lowest last eval loss of the pruned or diverged trials there, marked (and a legend), so that
    no trial that ran is left out unsaid. [] where there is no table to show."""
    lr, batch = spec.space.get("learning_rate"), spec.space.get("batch_size")
    ran = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")
           and isinstance(r["params"].get("learning_rate"), (int, float))]
    if lr is None or not ran:
        return []
    if lr.choices is not None:
        bins = [(v, v, value_text(v)) for v in sorted(lr.choices)]
    else:
        lo, hi = float(lr.low), float(lr.high)
        edges = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * k / LR_BINS) for k in range(LR_BINS + 1)]
        bins = [(a, b, f"{a:.2g}–{b:.2g}") for a, b in zip(edges, edges[1:])]
    if batch is None:
        sizes = [None]
    elif batch.choices is not None:
        sizes = sorted(batch.choices)
    else:  # an integer range: the sizes run so far, if few
        sizes = sorted({r["params"].get("batch_size") for r in ran} - {None})
    if len(sizes) > 8:
        return []
    best: dict[tuple[int, Any], float] = {}  # complete trials
    stopped: dict[tuple[int, Any], tuple[float, str]] = {}  # pruned ("p") and diverged ("d"): their last eval loss
    counts = [0] * len(bins)
    for r in ran:
        value = r["params"]["learning_rate"]
        k = next((i for i, (_, b, _) in enumerate(bins) if value <= b * (1 + 1e-9)), len(bins) - 1)
        key, loss = (k, r["params"].get("batch_size")), r["eval_loss"]
        counts[k] += 1
        if r["state"] == "COMPLETE" and loss is not None:
            best[key] = min(best.get(key, math.inf), loss)
        elif r["state"] == "PRUNED":  # (a diverged trial before its first eval has no loss: math.inf)
            got = (math.inf if loss is None else loss, "d" if row_diverged(r) else "p")
            stopped[key] = min(stopped.get(key, got), got)
    marked = {key: mark for key, mark in stopped.items() if key not in best}
    overall = min(best.values(), default=None)
    headers = ["all" if size is None else f"batch {size}" for size in sizes]
    table = _table("best eval loss: learning rate x batch size",
                   [("learning rate", False), *((header, True) for header in headers), ("trials", True)])
    pad = " " if marked else ""  # the digits of complete and marked cells line up

    def cell(key: tuple[int, Any]) -> Text:
        if key in best:
            return Text(f"{best[key]:.4f}{pad}", style="bold green" if best[key] == overall else "")
        if key in marked:
            loss, mark = marked[key]
            return Text(("" if loss == math.inf else f"{loss:.4f}") + mark,
                        style=STATES["pruned" if mark == "p" else "diverged"][1])
        return Text("·", style="bright_black")

    for k, (_, _, label) in enumerate(bins):
        table.add_row(Text(label), *(cell((k, s)) for s in sizes), Text(str(counts[k])))
    fitted = _fit(table, [*headers, "trials"], width)  # too wide: "trials" goes, then the largest batch sizes
    shown: list[RenderableType] = [fitted]
    if marked:
        shown.append(Text("p pruned, d diverged: their last eval loss, where no trial completed", style="bright_black"))
    kept = {str(column.header) for column in fitted.columns}
    if left_out := [header for header in headers if header not in kept]:
        shown.append(Text(f"{', '.join(left_out)}: left out, too wide for {width} columns", style="bright_black"))
    return shown


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
    """(line, style) for what a person should act on: silent and stopped workers (a failed preflight among them), a
    best config on the edge of the range, next to a diverged trial (_diverged_near) or within its repeats' noise of
    the next, failed trials not retried."""
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
                lines.append((f"the best config's {name}, {value_text(value)}, is at the {side} edge of the range "
                              f"{value_text(p.low)}..{value_text(p.high)}: widen the range (sweeper init --overwrite)",
                              "yellow"))
    if groups and (near := _diverged_near(spec, trials, groups[0])):
        lines.append((near, "yellow"))
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


def _diverged_near(spec: SweepSpec, trials: list[FrozenTrial], best: ConfigGroup) -> str:
    """Where the space tunes learning_rate and a diverged trial ran at most DIVERGED_NEAR times the best config's
    learning rate (or below it): the full run, on another seed or GPU, may diverge too. The line names the diverged
    trial nearest on a log scale; "" where there is none."""
    best_lr = best.params.get("learning_rate")
    if "learning_rate" not in spec.space or not isinstance(best_lr, (int, float)) or best_lr <= 0:
        return ""
    near = [(t, lr) for t in trials if t.state == TrialState.PRUNED and diverged_of(t)
            and isinstance(lr := t.params.get("learning_rate"), (int, float)) and 0 < lr <= DIVERGED_NEAR * best_lr]
    if not near:
        return ""
    trial, lr = min(near, key=lambda pair: abs(math.log(pair[1] / best_lr)))
    return (f"trial #{trial.number} diverged at learning_rate {value_text(lr)}, next to the best config's "
            f"{value_text(best_lr)} (#{best.best_trial}): {diverged_of(trial)}. Train the full run at a lower learning "
            "rate, or in bf16 where the GPU has it (compute capability 8.0 up)")
