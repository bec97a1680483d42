"""Every trial of a sweep: its rows, as a table (`report --all`), JSON and CSV; and the best config for the full run."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import datetime
from itertools import repeat
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.cells import cell_len
from rich.console import Console

from sweeper import configs
from sweeper.accounts import trial_gpu_hours
from sweeper.leases import chains, lease_note
from sweeper.record import (RESULT, RESUMES, STALE_REASON, WORKER, diverged_of, eval_loss_of, fail_reason, params_of,
                            row_info)
from sweeper.spec import SweepSpec
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
# What `--all` takes out of a row that does not fit, in order: numbers are left out, texts go on lines below.
TAKE_OUT = ["tok/s", "wall s", "steps", "note", "checkpoint", "GPU", "account"]
IN_BUDGET = ["complete", "pruned", "diverged", "running", "queued"]  # the states that hold a place in the budget
STATE_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "queued"}


def trial_rows(study: optuna.Study, store: Store | None = None, grace_s: float | None = None,
               trials: list[FrozenTrial] | None = None) -> list[dict[str, Any]]:
    """One plain dict per trial, in trial-number order: what every output format is made from. The store the
    study was opened from adds its notes (on a drive store, two workers that ran one enqueued point); with the
    lease grace, a running trial's note gives its lease's age. trials: the study's, if already loaded."""
    with gc_paused():  # an RDB store builds every trial here, and every row lives as long as the trials
        trials = study.get_trials(deepcopy=False) if trials is None else trials
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


_STATE_NAMES = {s: s.name for s in TrialState}  # Enum.name is a property, 4x slower than this lookup


def _row(t: FrozenTrial) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": _STATE_NAMES[t.state],
        "params": params_of(t),
        "eval_loss": eval_loss_of(t),
        "last_eval": max(t.intermediate_values, default=None),
        "datetime_start": t.datetime_start,  # datetimes: to_json writes them ISO 8601, the views need no text
        "datetime_complete": t.datetime_complete,
        "gpu_hours": trial_gpu_hours(t),
        "user_attrs": t.user_attrs,  # shared with the trial: read, never written
        "note": fail_reason(t) or t.user_attrs.get(STALE_REASON, "") or _diverged_note(t),
    }


def _diverged_note(t: FrozenTrial) -> str:
    reason = diverged_of(t) if t.state == TrialState.PRUNED else ""  # (a diverged trial is told PRUNED)
    return f"diverged: {reason}" if reason else ""


def summary(study: optuna.Study, spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    """`--all`'s first line: the budget (budget()), the best config, GPU-hours."""
    counts = budget(rows, spec.n_trials)
    finished = counts["complete"] + counts["pruned"] + counts["diverged"]
    parts = ", ".join(f"{name} {counts[name]}" for name in (*IN_BUDGET, "left") if counts[name])
    apart = "".join([f"; failed {counts['failed']}, outside the budget" if counts["failed"] else "",
                     f"; queued {counts['beyond']} beyond the budget" if counts["beyond"] else ""])
    return (f"study {study.study_name}: {finished}/{spec.n_trials} finished ({parts}{apart}); "
            f"{configs.best_text(configs.group_configs(rows))}; {gpu_hours(rows):.2f} GPU-hours")


def budget(rows: list[dict[str, Any]], n_trials: int) -> Counter:
    """The trials as the budget counts them, so that the figures add up to n_trials: IN_BUDGET's states hold a place
    (a diverged trial, told PRUNED, counted apart), "left" is the places no trial holds yet. Apart: "failed" (no
    place: a failed trial's resume holds it, once) and "beyond", queued trials past the budget, which no worker
    runs unless n_trials is raised (workers stop at it). A queued resume keeps its failed trial's place: first."""
    counts: Counter = Counter()
    resumes = 0
    for r in rows:
        state = "diverged" if r["state"] == "PRUNED" and configs.row_diverged(r) else STATE_WORDS[r["state"]]
        counts[state] += 1
        resumes += state == "queued" and RESUMES in r["user_attrs"]
    room = n_trials - counts["complete"] - counts["pruned"] - counts["diverged"] - counts["running"] - resumes
    counts["beyond"] = max(0, counts["queued"] - resumes - max(0, room))
    counts["queued"] -= counts["beyond"]
    counts["left"] = max(0, n_trials - sum(counts[name] for name in IN_BUDGET))
    return counts


def gpu_hours(rows: list[dict[str, Any]]) -> float:
    """What the trials used, as `sweeper accounts` counts it (accounts.trial_gpu_hours): running, failed and
    preempted time too; a trial on two GPUs at once used two GPU-hours an hour."""
    return sum(r["gpu_hours"] for r in rows)


def render_all(study: optuna.Study, spec: SweepSpec, rows: list[dict[str, Any]], console: Console) -> None:
    """Every trial, fitted to the console's width: a plain fixed-width table written directly (rich would lay out
    5,000 rows at about 1.5 ms each). No cell is ever cropped: where the row does not fit, columns are taken out
    in TAKE_OUT's order, a number left out (it is in --csv), a text shown whole on a line of its own below."""
    with gc_paused():  # the configs grouped for the best and the cells all live until printed
        console.print(summary(study, spec, rows), soft_wrap=True, markup=False, highlight=False)
        headers, right, columns = _table_columns(spec, rows)
        columns = [c if "".join(c).isprintable() else [printable(cell) for cell in c] for c in columns]
        widths = [max(map(len if "".join(c).isascii() else cell_len, [h, *c])) for h, c in zip(headers, columns)]
        inline, below = list(range(len(headers))), []
        for header in TAKE_OUT:  # until the row fits, 2 cells between columns
            if sum(widths[i] + 2 for i in inline) - 2 <= console.width:
                break
            inline.remove(headers.index(header))
            if header in ("GPU", "account", "checkpoint", "note"):
                below.append(headers.index(header))
        below.sort()

        def fit(text: str, i: int) -> str:
            pad = " " * (widths[i] - (len(text) if text.isascii() else cell_len(text)))
            return pad + text if headers[i] in right else text + pad

        console.print("  ".join(fit(headers[i], i) for i in inline).rstrip(), style="bold", markup=False,
                      highlight=False, soft_wrap=True)
        def fit_column(i: int) -> list[str]:  # a column of plain ASCII text is padded in one pass
            if "".join(columns[i]).isascii():
                return list(map(str.rjust if headers[i] in right else str.ljust, columns[i], repeat(widths[i])))
            return [fit(text, i) for text in columns[i]]

        lines = []
        for r, cells in enumerate(zip(*map(fit_column, inline))):
            lines.append("  ".join(cells).rstrip())
            lines.extend(f"{' ' * (widths[0] + 2)}{headers[i]}: {columns[i][r]}" for i in below if columns[i][r])
        if lines:
            console.file.write("\n".join(lines) + "\n")
            console.file.flush()


def printable(text: str) -> str:
    """A cell as one line the terminal shows as written: no newline or escape code of the data's own."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _table_columns(spec: SweepSpec, rows: list[dict[str, Any]]) -> tuple[list[str], set[str], list[list[str]]]:
    """Headers, the right-justified ones, and the plain text of every cell, a list per column."""
    param_names = list(spec.space)
    headers = ["#", "state", *param_names, "eval loss", *(h for _, h in ATTR_COLUMNS), "note"]
    right = {"#", *param_names, "eval loss", "steps", "wall s", "tok/s"}
    sources = _attr_sources(rows)
    columns = [
        [str(r["number"]) for r in rows],
        [r["state"].lower() for r in rows],
        *([configs.value_text(r["params"].get(name)) for r in rows] for name in param_names),
        ["" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}" + (
            f" @{r['last_eval']}" if r["state"] == "PRUNED" and r["last_eval"] is not None else "") for r in rows],
        *(list(map(configs.value_text, _attr_column(sources, key))) for key, _ in ATTR_COLUMNS),
        [r["note"] for r in rows],
    ]
    return headers, right, columns


def _attr_sources(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(r["user_attrs"].get(RESULT, {}), r["user_attrs"].get(WORKER, {})) for r in rows]


def _attr_column(sources: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> list[Any]:
    """[row_info(r).get(key) for r in rows], without building the merged dicts."""
    return [result[key] if key in result else worker.get(key) for result, worker in sources]


def to_json(rows: Any) -> str:
    """Rows (or any of their parts) as JSON; datetimes in ISO 8601."""
    return json.dumps(rows, indent=2, default=_json_value)


def rows_json(rows: list[dict[str, Any]]) -> str:
    """Every trial's row as one JSON array, a trial a line: written by json's C encoder, which takes no indent
    (3x faster than to_json's indent=2 on 5,000 trials, and half the size)."""
    return "[" + ",\n ".join(json.dumps(r, default=_json_value) for r in rows) + "]"


def _json_value(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def to_csv(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    attrs = [a for a, _ in ATTR_COLUMNS] + ["platform", "micro_batch", "grad_accum", "peak_mem_mb", "fail_reason"]
    writer = csv.writer(out)
    writer.writerow(["number", "state", *spec.space, "eval_loss", *attrs, "note"])
    for r in rows:
        writer.writerow([r["number"], r["state"], *(r["params"].get(n, "") for n in spec.space),
                         "" if r["eval_loss"] is None else r["eval_loss"],
                         *(_csv_cell(row_info(r).get(a)) for a in attrs), r["note"]])
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    return "" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else value


def best_config(study: optuna.Study, spec: SweepSpec) -> dict[str, Any]:
    """The full-run config: the best config's params over everything the spec fixes (sweeper/configs.py)."""
    rows = trial_rows(study)
    return configs.full_run_config(study.study_name, spec, rows, configs.group_configs(rows))
