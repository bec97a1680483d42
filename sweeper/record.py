"""What a trial record holds: the attr names every part of sweeper reads and writes, and how to read them.

runner/worker.py writes two user attrs, one store write each: WORKER (id, account, platform, gpu) when a trial
starts and RESULT (runner.train.TrialResult's fields, or fail_reason) when it ends. A diverged trial (a NaN or inf
loss) is told PRUNED, its value the last finite eval loss, and its RESULT carries DIVERGED (the reason). Before its
first claim every worker writes its machine card (runner/doctor.py: the preflight's checks) as the study user attr
CARD + its id. sweeper/leases.py writes the lease (a system attr) and, on a takeover, the resume attrs.
"""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial, TrialState

RESULT = "result"  # user attr: what the trial produced (eval loss aside), or {"fail_reason": ...}
WORKER = "worker"  # user attr: who ran it: id, account, platform, gpu
LEASE = "sweeper:lease"  # system attr: a running trial's heartbeat (sweeper/leases.py)
RESUMES = "resumes"  # user attr: the key (trial_key) of the trial this one continues
RESUME_FROM = "resume_from"  # user attr: the checkpoint folder to resume from
STALE_REASON = "stale_reason"  # user attr on a trial failed by a takeover
TAKEOVER = "takeover"  # user attr beside it: the taking worker ("by"), its wall time ("at"), the silence it saw
ORIGIN = "sweeper:origin"  # system attr, on stores whose trial numbers are each view's own (drive): its name
SEED = "seed"  # user attr of a repeat (sweeper enqueue --repeat): its train.seed; without it, the spec's
CARD = "worker_card:"  # study user attr per worker: its machine card (runner/doctor.py), written before its first claim
WORKER_STOPPED = "worker_stopped:"  # study user attr per worker that gave up: who, where, why (sweeper/leases.py)
PER_WORKER = (CARD, WORKER_STOPPED)  # study user attrs each written by one worker alone, under its own id
DIVERGED = "diverged"  # key of RESULT: why the loss became NaN/inf ("training loss became nan at step 3 (fp16)")
STUDY_KEY = "sweeper_key"  # study user attr made at init: checkpoint folders are named by it, never by the name alone
FIXED_PARAMS = "fixed_params"  # Optuna's system attr: an enqueued trial's params until it runs
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts against the budget
METRIC = "eval_loss"  # the objective's name in every Optuna tool (create_study sets it: study.set_metric_names)


def params_of(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's params, or for an enqueued trial not yet run, the params it will run with."""
    return dict(trial.params or trial.system_attrs.get(FIXED_PARAMS, {}))


def result_of(trial: FrozenTrial) -> dict[str, Any]:
    value = trial.user_attrs.get(RESULT)
    return value if isinstance(value, dict) else {}


def worker_of(trial: FrozenTrial) -> dict[str, Any]:
    value = trial.user_attrs.get(WORKER)
    return value if isinstance(value, dict) else {}


def lease_of(trial: FrozenTrial) -> dict[str, Any]:
    value = trial.system_attrs.get(LEASE)
    return value if isinstance(value, dict) else {}


def fail_reason(trial: FrozenTrial) -> str:
    return str(result_of(trial).get("fail_reason") or "")


def diverged_of(trial: FrozenTrial) -> str:
    """Why a diverged trial's loss became NaN or inf; "" for any other trial."""
    return str(result_of(trial).get(DIVERGED) or "")


def cards(study_user_attrs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Worker id -> its machine card, from the study's user attrs."""
    return {k[len(CARD):]: v for k, v in study_user_attrs.items() if k.startswith(CARD) and isinstance(v, dict)}


def trial_key(trial: FrozenTrial) -> int | str:
    """A trial's name that every worker's view shares: its number, or where numbers are each view's own, its origin."""
    return trial.system_attrs.get(ORIGIN, trial.number)


def row_info(row: dict[str, Any]) -> dict[str, Any]:
    """What the worker recorded about a trial, from its report row (report.trial_rows): WORKER and RESULT, merged."""
    attrs = row["user_attrs"]
    return {**attrs.get(WORKER, {}), **attrs.get(RESULT, {})}


def resumed_from(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """Trial number -> the trial it continues (its RESUMES attr), for each resume whose trial is among `trials`."""
    by_key = {trial_key(t): t for t in trials}
    return {t.number: by_key[key] for t in trials if (key := t.user_attrs.get(RESUMES)) is not None and key in by_key}


def eval_loss_of(trial: FrozenTrial) -> float | None:
    """The objective for a finished trial; the last reported eval loss for a pruned or running one."""
    if trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None
