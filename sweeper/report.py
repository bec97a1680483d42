"""Where a sweep stands: the trial table (rich, JSON, CSV) and the best config for the full run."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment, Segments
from rich.style import Style
from rich.table import Table
from rich.text import Text

from sweeper.errors import SweeperError
from sweeper.leases import chains, lease_note
from sweeper.record import RESULT, STALE_REASON, WORKER, fail_reason, params_of
from sweeper.spec import SweepSpec, drop_none
from sweeper.storage import Store, gc_paused

# Columns shown from a trial's WORKER and RESULT attrs (sweeper/record.py): (key, header).
ATTR_COLUMNS = [
    ("steps", "steps"),
    ("wall_time_s", "wall s"),
    ("tokens_per_s", "tok/s"),
    ("gpu", "GPU"),
    ("account", "account"),
    ("checkpoint", "checkpoint"),
]
STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}


def trial_rows(study: optuna.Study, store: Store | None = None, grace_s: float | None = None) -> list[dict[str, Any]]:
    """One plain dict per trial, in trial-number order: what every output format is made from. The store the
    study was opened from adds its notes (on a drive store, two workers that ran one enqueued point); with the
    lease grace, a running trial's note gives its lease's age."""
    with gc_paused():  # an RDB store builds every trial here
        trials = study.get_trials(deepcopy=False)
        rows = [_row(t) for t in trials]
    if grace_s is not None:
        for t in trials:
            if t.state == TrialState.RUNNING:
                rows[t.number]["note"] = "; ".join(filter(None, [rows[t.number]["note"], lease_note(t, grace_s)]))
    for number, note in (store.trial_notes(trials) if store else {}).items():
        rows[number]["note"] = note
    for number, chain in chains(trials).items():  # "resumes #12" / "resumed as #31"
        rows[number]["note"] = "; ".join(filter(None, [chain, rows[number]["note"]]))
    return rows


def _row(t: FrozenTrial) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "params": params_of(t),
        "eval_loss": _eval_loss(t),
        "last_eval": max(t.intermediate_values, default=None),
        "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
        "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        "user_attrs": dict(t.user_attrs),
        "note": fail_reason(t) or t.user_attrs.get(STALE_REASON, ""),
    }


def info(row: dict[str, Any]) -> dict[str, Any]:
    """What the worker recorded about a trial: its WORKER and RESULT attrs, merged."""
    attrs = row["user_attrs"]
    return {**attrs.get(WORKER, {}), **attrs.get(RESULT, {})}


def _eval_loss(t: FrozenTrial) -> float | None:
    """The objective for a finished trial; the last reported eval loss for a pruned or running one."""
    if t.value is not None:
        return t.value
    if t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def best_number(rows: list[dict[str, Any]]) -> int | None:
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["eval_loss"] is not None]
    return min(complete, key=lambda r: r["eval_loss"])["number"] if complete else None


def summary(study: optuna.Study, spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    counts = {s.name: 0 for s in TrialState}
    for r in rows:
        counts[r["state"]] += 1
    finished = counts["COMPLETE"] + counts["PRUNED"]
    best = best_number(rows)
    best_text = f"best #{best}: {next(r for r in rows if r['number'] == best)['eval_loss']:.4f}" if best is not None else "no complete trial yet"
    sources = _attr_sources(rows)  # a trial on two GPUs at once used two GPU-hours an hour
    gpu_hours = sum((s or 0) * (g or 1) for s, g in zip(_attr_column(sources, "wall_time_s"), _attr_column(sources, "gpus"))) / 3600
    parts = [f"{k.lower()} {v}" for k, v in counts.items() if v]
    return f"study {study.study_name}: {finished}/{spec.n_trials} finished ({', '.join(parts) or 'no trials'}); {best_text}; {gpu_hours:.2f} GPU-hours"


def render_table(study: optuna.Study, spec: SweepSpec, rows: list[dict[str, Any]], console: Console,
                 fast: bool = True) -> None:
    """The trial table, the best trial in bold green. fast=False draws it a rich row per trial: the
    same text, at about 2 ms a trial (the reference the fast path is tested against)."""
    headers, right, columns = _table_columns(spec, rows)
    styles = [STATE_STYLE.get(r["state"], "") for r in rows]
    best = best_number(rows)
    best_index = next((i for i, r in enumerate(rows) if r["number"] == best), None)

    def new_table() -> Table:
        table = Table(title=summary(study, spec, rows), title_justify="left")
        for header in headers:
            table.add_column(header, justify="right" if header in right else "left")
        return table

    with gc_paused():  # the trials just loaded are all young: a collection now would walk every one
        if not (fast and rows and _print_fast(console, new_table(), columns, styles, best_index)):
            console.print(_row_per_trial(new_table(), columns, styles, best_index))


def _table_columns(spec: SweepSpec, rows: list[dict[str, Any]]) -> tuple[list[str], set[str], list[list[str]]]:
    """Headers, the right-justified ones, and the plain text of every cell, a list per column."""
    param_names = list(spec.space)
    headers = ["#", "state", *param_names, "eval loss", *(h for _, h in ATTR_COLUMNS), "note"]
    right = {"#", *param_names, "eval loss", "steps", "wall s", "tok/s"}
    sources = _attr_sources(rows)
    columns = [
        [str(r["number"]) for r in rows],
        [r["state"].lower() for r in rows],
        *([_fmt(r["params"].get(name)) for r in rows] for name in param_names),
        ["" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}" + (
            f" @{r['last_eval']}" if r["state"] == "PRUNED" and r["last_eval"] is not None else "") for r in rows],
        *(list(map(_fmt, _attr_column(sources, key))) for key, _ in ATTR_COLUMNS),
        [r["note"] for r in rows],
    ]
    return headers, right, columns


def _attr_sources(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(r["user_attrs"].get(RESULT, {}), r["user_attrs"].get(WORKER, {})) for r in rows]


def _attr_column(sources: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> list[Any]:
    """[info(r).get(key) for r in rows], without building the merged dicts."""
    return [result[key] if key in result else worker.get(key) for result, worker in sources]


def _row_per_trial(table: Table, columns: list[list[str]], styles: list[str], best_index: int | None) -> Table:
    """The table as rich draws it, a rich row per trial. Cells are Text, never markup: an account
    "[lab]" or a path holding ":smile:" shows as written."""
    for i, row in enumerate(zip(*columns)):
        state = Text(row[1])
        state.stylize(styles[i])  # a span over the word, as markup "[red]fail[/]" gave
        table.add_row(Text(row[0]), state, *map(Text, row[2:]), style="bold green" if i == best_index else None)
    return table


class _ColumnWidth:
    """Stands in for a whole column in a one-row table: measures as its cells would, and records
    the width rich then gives it."""

    def __init__(self, cells: list[str], lengths: list[int], measure: Callable[[str], int], spaces: bool) -> None:
        # Text's own measure: (longest word, longest line), or the line's length when it has no word.
        words = (max(map(measure, c.split()), default=n) if " " in c else n for c, n in zip(cells, lengths))
        self.measurement = Measurement(max(words) if spaces else max(lengths), max(lengths))
        self.width: int | None = None

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return self.measurement

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        self.width = options.max_width
        yield Segment("")


def _print_fast(console: Console, table: Table, columns: list[list[str]], styles: list[str],
                best_index: int | None) -> bool:
    """Print what _row_per_trial would, at a fraction of its cost (rich spends about 2 ms a trial:
    10 s for 5,000). Rich still draws the title, header and borders of `table` (empty, given a
    one-row stand-in) and picks every width; the rows are written here. False, printing nothing,
    where a cell would wrap onto a second line or is not plain printable text: rich handles those."""
    texts = ["\n".join(column) for column in columns]
    if not all(_plain_lines(text) for text in texts):
        return False
    is_ascii = [text.isascii() for text in texts]  # then a character is a cell
    measures = [len if a else cell_len for a in is_ascii]
    lengths = [list(map(m, column)) for m, column in zip(measures, columns)]
    stand_ins = [_ColumnWidth(c, n, m, " " in text) for c, n, m, text in zip(columns, lengths, measures, texts)]
    table.add_row(*stand_ins)
    lines = console.render_lines(table, console.options, pad=False)
    widths = [s.width for s in stand_ins]
    if any(w is None or w < 1 for w in widths):
        return False

    fitted = []
    for column, n_cells, width, a, column_def in zip(columns, lengths, widths, is_ascii, table.columns):
        right = column_def.justify == "right"
        if a and max(n_cells) <= width:
            fitted.append(list(map(str.rjust if right else str.ljust, column, itertools.repeat(width))))
            continue
        fitted_column = []
        for cell, n in zip(column, n_cells):
            if n <= width:
                fitted_column.append(" " * (width - n) + cell if right else cell + " " * (width - n))
            elif " " in cell:  # (plain cells hold no other whitespace)
                return False  # rich would wrap it over two lines
            else:
                fitted_column.append(set_cell_size(cell, width - 1) + "…")  # as rich crops a long word
        fitted.append(fitted_column)

    # The stand-in row (second-last line) gives the rules: "|" + (pad, cell, pad) + "|" + ... + "|".
    rule_line = "".join(seg.text for seg in lines[-2])
    border = lines[-2][0].style
    rules = [rule_line[i] for i in itertools.accumulate((w + 3 for w in widths), initial=0)]
    plain_rules = not border and len(set(rules[1:-1])) == 1
    new_line = Segment.line()
    state_styles = {name: console.get_style(name) if name else None for name in set(styles)}
    best_style = console.get_style("bold green")
    states = [s.rstrip(" ") for s in fitted[1]]  # column 1: only the state word is coloured, not its padding
    sep = f" {rules[1]} "
    rests = map(sep.join, zip(*fitted[2:]))

    segments = [seg for line in lines[:-2] for seg in (*line, new_line)]
    for i, (number, state_cell, state, rest) in enumerate(zip(fitted[0], fitted[1], states, rests)):
        state_style = state_styles[styles[i]]
        if plain_rules and i != best_index:  # three segments make the row
            segments += (Segment(f"{rules[0]} {number}{sep}"), Segment(state, state_style),
                         Segment(f"{state_cell[len(state):]}{sep}{rest} {rules[-1]}"), new_line)
            continue
        row_style = best_style if i == best_index else None
        segments += (Segment(rules[0], border), Segment(f" {number} ", row_style), Segment(rules[1], border),
                     Segment(" ", row_style), Segment(state, Style.combine([row_style or Style(), state_style or Style()])),
                     Segment(f"{state_cell[len(state):]} ", row_style))
        for k in range(2, len(fitted)):
            segments += (Segment(rules[k], border), Segment(f" {fitted[k][i]} ", row_style))
        segments += (Segment(rules[-1], border), new_line)
    segments += (*lines[-1], new_line)
    console.print(Segments(segments), crop=False)  # every line fits: rich's crop pass would only cost time
    return True


def _plain_lines(text: str) -> bool:
    """True when every line is printable text with no space at either end (and no other whitespace)."""
    return text.replace("\n", "").isprintable() and not (
        text.startswith(" ") or text.endswith(" ") or " \n" in text or "\n " in text)


def _fmt(value: Any) -> str:
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4g}"
    return str(value)


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, default=str)


def to_csv(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    attrs = [a for a, _ in ATTR_COLUMNS] + ["platform", "micro_batch", "grad_accum", "peak_mem_mb", "fail_reason"]
    writer = csv.writer(out)
    writer.writerow(["number", "state", *spec.space, "eval_loss", *attrs, "note"])
    for r in rows:
        writer.writerow([r["number"], r["state"], *(r["params"].get(n, "") for n in spec.space),
                         "" if r["eval_loss"] is None else r["eval_loss"],
                         *(_csv_cell(info(r).get(a)) for a in attrs), r["note"]])
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    return "" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else value


def best_config(study: optuna.Study, spec: SweepSpec) -> dict[str, Any]:
    """The full-run config: the best trial's params over everything the spec fixes."""
    rows = trial_rows(study)
    number = best_number(rows)
    if number is None:
        raise SweeperError(f"study {study.study_name!r} has no complete trial yet")
    best = next(r for r in rows if r["number"] == number)
    config = {
        "study": study.study_name,
        "best_trial": number,
        "eval_loss": best["eval_loss"],
        "model": asdict(spec.model),
        "data": asdict(spec.data),
        "train": asdict(spec.trial_config(best["params"])),
        "budget_per_trial": asdict(spec.budget),
    }
    measured = {k: v for k, v in info(best).items() if k in ("micro_batch", "grad_accum", "gpus", "gpu", "precision")}
    if measured:
        config["measured_on_best_trial"] = measured
    return drop_none(config)
