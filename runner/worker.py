"""The worker loop: claim the next trial (enqueued first) -> train -> tell, until the sweep or session ends."""

from __future__ import annotations

import statistics
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from runner.platform import Platform, detect
from sweeper.errors import SweeperError
from sweeper.spec import SweepSpec
from sweeper.storage.gsheets import JournalChanged, update_views
from sweeper.study import load_study, suggest

MAX_FAILURES_IN_A_ROW = 3
DEADLINE_MARGIN_S = 300  # leave this much of the session for checkpointing and telling


@dataclass
class WorkerSummary:
    worker_id: str
    trials: list[int] = field(default_factory=list)
    stop_reason: str = ""


def budget_reached(study: optuna.Study, spec: SweepSpec) -> bool:
    """Finished (complete or pruned) plus running trials reach n_trials; failed ones do not count."""
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=counted)) >= spec.n_trials


def estimated_trial_seconds(study: optuna.Study, gpu: str) -> float | None:
    """Median wall time of complete trials on this GPU type, from any worker."""
    times = [t.user_attrs.get("result", {}).get("wall_time_s") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if t.user_attrs.get("worker", {}).get("gpu") == gpu]
    times = [s for s in times if s]
    return statistics.median(times) if times else None


def _stop_reason(study, spec, platform: Platform, ran: int, max_trials: int | None) -> str | None:
    if budget_reached(study, spec):
        return f"the study's budget of {spec.n_trials} trials is met"
    if max_trials is not None and ran >= max_trials:
        return f"ran --max-trials {max_trials}"
    estimate = estimated_trial_seconds(study, platform.gpu_name) or 0
    if platform.seconds_left() < estimate * 1.2 + DEADLINE_MARGIN_S:
        return f"the session deadline is {platform.seconds_left() / 60:.0f} min away, too close for another trial"
    return None


def _tell_failed(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("result", {"fail_reason": reason})
    study.tell(trial, state=TrialState.FAIL)


def run_worker(store: str, study: str | None = None, *, max_trials: int | None = None, account: str | None = None,
               checkpoint_root: str | None = None, deadline_hours: float | None = None,
               precision: str | None = None, log: Callable[[str], None] = print) -> WorkerSummary:
    """Join a study (None: the store's only one) and run trials until its budget is met, max_trials ran,
    or the session deadline nears."""
    from runner.train import prepare_data, quiet_libraries, result_attrs, run_trial

    quiet_libraries()
    platform = detect(account, checkpoint_root, deadline_hours)
    summary = WorkerSummary(f"{platform.account}/{uuid.uuid4().hex[:8]}")
    worker_seed = zlib.crc32(summary.worker_id.encode())
    optuna_study, spec = load_study(store, study, worker_seed=worker_seed)
    study = optuna_study.study_name
    log(f"worker {summary.worker_id} on {platform.name} ({platform.gpu_name}) joins study {study!r}")
    sweep_data = prepare_data(spec)
    log(f"data: {len(sweep_data.train)} train and {len(sweep_data.eval)} eval sequences of {spec.model.max_seq_len} tokens")

    failures_in_a_row = 0
    gpu_seconds = 0.0

    def views(trial_number: int | None) -> None:
        """The sheet's people-facing views (a no-op on other stores); Optuna keeps the storage on the study."""
        update_views(optuna_study._storage, optuna_study,
                     {"worker": summary.worker_id, "account": platform.account, "platform": platform.name,
                      "gpu": platform.gpu_name, "trial": trial_number, "gpu_hours": gpu_seconds / 3600})

    trial = None
    while True:
        try:
            if (reason := _stop_reason(optuna_study, spec, platform, len(summary.trials), max_trials)) is not None:
                break
            trial = optuna_study.ask()
            params = suggest(trial, spec)
            trial.set_user_attr("worker", {"id": summary.worker_id, "account": platform.account,
                                           "platform": platform.name, "gpu": platform.gpu_name})
            summary.trials.append(trial.number)
            log(f"trial {trial.number}: {params}")
            views(trial.number)

            def report(k: int, loss: float, trial=trial) -> bool:
                trial.report(loss, k)
                views(trial.number)
                return trial.should_prune()

            trial_dir = platform.checkpoint_root / study / f"trial-{trial.number:04d}"
            try:
                result = run_trial(spec, params, trial_dir, sweep_data, report, precision=precision, log=log)
            except JournalChanged:
                raise
            except (SweeperError, RuntimeError, ValueError, OSError) as e:
                reason_text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                _tell_failed(optuna_study, trial, reason_text)
                log(f"trial {trial.number} failed: {reason_text}")
                failures_in_a_row += 1
                if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    raise SweeperError(f"{failures_in_a_row} trials failed in a row; last: {reason_text}") from None
                continue
            failures_in_a_row = 0
            gpu_seconds += result.wall_time_s
            trial.set_user_attr("result", result_attrs(result))
            if result.pruned_at is not None:
                optuna_study.tell(trial, state=TrialState.PRUNED)
                log(f"trial {trial.number} pruned at eval {result.pruned_at} (eval loss {result.eval_loss:.4f})")
            else:
                optuna_study.tell(trial, result.eval_loss)
                log(f"trial {trial.number} complete: eval loss {result.eval_loss:.4f}, "
                    f"{result.tokens_per_s:.0f} tok/s, {result.wall_time_s:.1f} s")
            trial = None
            views(None)
        except JournalChanged as e:
            # The shared sheet changed under us (a hand edit, a lost race): start again from what it says now,
            # and fail the trial we held, so it does not sit RUNNING against the budget.
            log(f"{e}; reloading the study")
            optuna_study, spec = load_study(store, study, worker_seed=worker_seed)
            if trial is not None:
                held = optuna.trial.Trial(optuna_study, trial._trial_id)  # the same trial, on the reloaded store
                if optuna_study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                    _tell_failed(optuna_study, held, f"JournalChanged: {e}")
            trial = None
    summary.stop_reason = reason
    log(f"worker {summary.worker_id} stops: {reason}")
    return summary
