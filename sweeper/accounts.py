"""GPU-hours and trials per account label and platform, per day and per week, from the trials' own records.

A trial counts on the day its worker started it (datetime_start, on the worker's clock: UTC on Colab and Kaggle);
weeks are ISO weeks, Monday to Sunday. A trial's GPU-hours (trial_gpu_hours, which the report sums too) are its
RESULT's wall_time_s x gpus; a trial that recorded none (failed, preempted, still running) counts from its start
to its end, or for a running or taken-over trial to its last heartbeat. Only time inside trials counts: a platform's own meter also counts
model loading and idle time, so its figure is the higher one.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.errors import UserError
from sweeper.record import STALE_REASON, lease_of, result_of, worker_of

UNKNOWN = "?"  # a trial with no WORKER attr: enqueued by hand into a running state, or from an older sweeper


def parse_allowances(values: tuple[str, ...] | list[str]) -> dict[str | None, float]:
    """`--weekly-hours` values, `HOURS` (every platform) or `PLATFORM=HOURS`, to {platform or None: hours}."""
    allowances: dict[str | None, float] = {}
    for value in values:
        platform, _, hours = value.rpartition("=")
        try:
            number = float(hours)
        except ValueError:
            number = -1.0
        if not number >= 0 or number == float("inf"):
            raise UserError(f"--weekly-hours takes HOURS or PLATFORM=HOURS, e.g. 30 or kaggle=30 (got {value!r})")
        allowances[platform.strip() or None] = number
    return allowances


def trial_gpu_hours(t: FrozenTrial, default_gpus: int = 1, now: dt.datetime | None = None) -> float:
    """What one trial used: its RESULT's wall_time_s x gpus; without one (failed, preempted, running), from its start
    to its end, or for a running or taken-over trial to its last heartbeat, on the worker's own clock where the
    lease says when the trial began (a reader in another time zone would skew a naive start time)."""
    if t.datetime_start is None:
        return 0.0
    result = result_of(t)
    gpus = result.get("gpus") or default_gpus
    if isinstance(result.get("wall_time_s"), (int, float)):
        return float(result["wall_time_s"]) * gpus / 3600
    lease = lease_of(t)
    beat, since = lease.get("at"), lease.get("since")
    if t.state == TrialState.RUNNING or STALE_REASON in t.user_attrs:  # alive, or until it went silent
        if isinstance(beat, (int, float)) and isinstance(since, (int, float)):
            return max(0.0, beat - since) * gpus / 3600  # both on the worker's clock
        end = dt.datetime.fromtimestamp(beat) if isinstance(beat, (int, float)) else now or dt.datetime.now()
    else:
        end = t.datetime_complete or now or dt.datetime.now()
    return max(0.0, (end - t.datetime_start).total_seconds()) * gpus / 3600


def trial_usage(trials: list[FrozenTrial], default_gpus: int = 1, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """One record per trial that started: number, account, platform, gpu, state, day, week, gpu_hours."""
    now = now or dt.datetime.now()
    usage = []
    for t in trials:
        if t.datetime_start is None:  # enqueued, never run
            continue
        worker = worker_of(t)
        year, week, _ = t.datetime_start.isocalendar()
        usage.append({
            "number": t.number, "account": str(worker.get("account") or UNKNOWN),
            "platform": str(worker.get("platform") or UNKNOWN), "gpu": worker.get("gpu"), "state": t.state.name,
            "day": t.datetime_start.date().isoformat(), "week": f"{year}-W{week:02d}",
            "gpu_hours": trial_gpu_hours(t, default_gpus, now),
        })
    return usage


def accounts(study: optuna.Study, allowances: dict[str | None, float], default_gpus: int = 1,
             now: dt.datetime | None = None) -> dict[str, Any]:
    """The whole picture: per account and platform (with what is left of this week's allowance), per week, per day."""
    now = now or dt.datetime.now()
    year, week, _ = now.isocalendar()
    this_week = f"{year}-W{week:02d}"
    usage = trial_usage(study.get_trials(deepcopy=False), default_gpus, now)

    def grouped(*keys: str) -> list[dict[str, Any]]:
        groups: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"trials": 0, "gpu_hours": 0.0})
        for u in usage:
            group = groups[tuple(u[k] for k in keys)]
            group["trials"] += 1
            group["gpu_hours"] += u["gpu_hours"]
        return [{**dict(zip(keys, key)), **value} for key, value in sorted(groups.items())]

    totals = grouped("account", "platform")
    for row in totals:
        mine = [u for u in usage if (u["account"], u["platform"]) == (row["account"], row["platform"])]
        row["gpu_names"] = sorted({u["gpu"] for u in mine if u["gpu"]})
        row["this_week_gpu_hours"] = sum(u["gpu_hours"] for u in mine if u["week"] == this_week)
        allowance = allowances.get(row["platform"], allowances.get(None))
        row["weekly_allowance_hours"] = allowance
        row["left_this_week_hours"] = None if allowance is None else allowance - row["this_week_gpu_hours"]
    return {"study": study.study_name, "this_week": this_week, "accounts": totals,
            "weeks": grouped("week", "account", "platform"), "days": grouped("day", "account", "platform")}


def render(report: dict[str, Any], console: Any) -> None:
    """The three tables, each narrow enough for an 80-column terminal."""
    from rich.table import Table
    from rich.text import Text

    if not report["accounts"]:
        console.print(f"study {report['study']}: no trial has started yet", markup=False, highlight=False)
        return
    allowed = any(r["weekly_allowance_hours"] is not None for r in report["accounts"])
    table = Table(title=f"study {report['study']}: GPU-hours by account (this week: {report['this_week']})",
                  title_justify="left")
    for header in ["account", "platform", "GPUs", "trials", "GPU-h", "this week", *(["left"] if allowed else [])]:
        table.add_column(header, justify="left" if header in ("account", "platform", "GPUs") else "right")
    for r in report["accounts"]:
        left = r["left_this_week_hours"]
        left_cell = Text("" if left is None else f"{left:.2f}", style="red" if left is not None and left < 0 else "")
        table.add_row(Text(r["account"]), Text(r["platform"]), Text(", ".join(r["gpu_names"])), str(r["trials"]),
                      f"{r['gpu_hours']:.2f}", f"{r['this_week_gpu_hours']:.2f}", *([left_cell] if allowed else []))
    console.print(table)
    for key, title in (("weeks", "per week"), ("days", "per day")):
        table = Table(title=title, title_justify="left")
        for header in [key[:-1], "account", "platform", "trials", "GPU-h"]:
            table.add_column(header, justify="right" if header in ("trials", "GPU-h") else "left")
        for r in report[key]:
            table.add_row(r[key[:-1]], Text(r["account"]), Text(r["platform"]), str(r["trials"]), f"{r['gpu_hours']:.2f}")
        console.print(table)
