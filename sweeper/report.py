"""Where a sweep stands: the trial table (rich, JSON, CSV) and the best config for the full run."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from sweeper.errors import SweeperError
from sweeper.spec import SweepSpec, drop_none

# runner/worker.py writes two trial user attrs, one store write each: "worker" (id, account,
# platform, gpu) when a trial starts and "result" (runner.train.TrialResult, or fail_reason) when
# it ends. Columns shown from them: (key, header).
ATTR_COLUMNS = [
    ("steps", "steps"),
    ("wall_time_s", "wall s"),
    ("tokens_per_s", "tok/s"),
    ("gpu", "GPU"),
    ("account", "account"),
    ("checkpoint", "checkpoint"),
]
STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain dict per trial, in trial-number order: what every output format is made from."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "params": dict(t.params or t.system_attrs.get("fixed_params", {})),
            "eval_loss": _eval_loss(t),
            "last_eval": max(t.intermediate_values, default=None),
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "user_attrs": dict(t.user_attrs),
        })
    return rows


def info(row: dict[str, Any]) -> dict[str, Any]:
    """What the worker recorded about a trial: its "worker" and "result" attrs, merged."""
    attrs = row["user_attrs"]
    return {**attrs.get("worker", {}), **attrs.get("result", {})}


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
    gpu_hours = sum(info(r).get("wall_time_s") or 0 for r in rows) / 3600
    parts = [f"{k.lower()} {v}" for k, v in counts.items() if v]
    return f"study {study.study_name}: {finished}/{spec.n_trials} finished ({', '.join(parts) or 'no trials'}); {best_text}; {gpu_hours:.2f} GPU-hours"


def render_table(study: optuna.Study, spec: SweepSpec, rows: list[dict[str, Any]], console: Console) -> None:
    param_names = list(spec.space)
    table = Table(title=summary(study, spec, rows), title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("state")
    for name in param_names:
        table.add_column(name, justify="right")
    table.add_column("eval loss", justify="right")
    for _, header in ATTR_COLUMNS:
        table.add_column(header, justify="right" if header in ("steps", "wall s", "tok/s") else "left")
    best = best_number(rows)
    for r in rows:
        attrs = info(r)
        loss = "" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        if r["state"] == "PRUNED" and r["last_eval"] is not None:
            loss += f" @{r['last_eval']}"
        cells = [str(r["number"]), f"[{STATE_STYLE.get(r['state'], '')}]{r['state'].lower()}[/]"]
        cells += [_fmt(r["params"].get(n)) for n in param_names]
        cells += [loss] + [_fmt(attrs.get(a)) for a, _ in ATTR_COLUMNS]
        table.add_row(*cells, style="bold green" if r["number"] == best else None)
    console.print(table)


def _fmt(value: Any) -> str:
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
    writer.writerow(["number", "state", *spec.space, "eval_loss", *attrs])
    for r in rows:
        writer.writerow([r["number"], r["state"], *(r["params"].get(n, "") for n in spec.space),
                         "" if r["eval_loss"] is None else r["eval_loss"],
                         *(_csv_cell(info(r).get(a)) for a in attrs)])
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
    measured = {k: v for k, v in info(best).items() if k in ("micro_batch", "grad_accum", "gpu", "precision")}
    if measured:
        config["measured_on_best_trial"] = measured
    return drop_none(config)
