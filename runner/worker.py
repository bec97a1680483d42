"""The worker loop: take over stale trials, claim the next trial (enqueued first) -> train -> tell, until the
sweep or the session ends. A running trial keeps a lease (sweeper/leases.py); leaving mid-trial (deadline,
SIGTERM, Ctrl-C) checkpoints and hands the trial over to be resumed."""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import signal
import statistics
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from runner.platform import Platform, detect, require_gpu, shared_checkpoints
from runner.progress import TrialBar, watched
from sweeper.errors import StoreChanged, SweeperError, first_line
from sweeper.leases import (Heartbeat, Watcher, grace_s, hand_over, record_worker_stop, superseded,
                            take_over_stale)
from sweeper.record import FINISHED, RESULT, RESUME_FROM, RESUMES, WORKER, result_of, trial_key, worker_of
from sweeper.spec import SweepSpec
from sweeper.storage import open_store
from sweeper.study import load_study, suggest

MAX_FAILURES_IN_A_ROW = 3
DEADLINE_MARGIN_S = 300  # leave this much of the session for checkpointing and telling


class Superseded(Exception):
    """Another record holds this trial's place: a drive claim on its enqueued point that wins, or the trial
    this one resumes finishing after all. The message is the fail reason."""


@dataclass
class WorkerSummary:
    worker_id: str
    trials: list[int] = field(default_factory=list)
    stop_reason: str = ""
    took_over: int = 0


def estimated_trial_seconds(study: optuna.Study, gpu: str) -> float | None:
    """Median wall time of complete trials on this GPU type, from any worker."""
    times = [result_of(t).get("wall_time_s") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if worker_of(t).get("gpu") == gpu]
    times = [s for s in times if s]
    return statistics.median(times) if times else None


def _budget(study: optuna.Study) -> tuple[int, int, int]:
    """(finished: complete or pruned, running, waiting resumes) trials. Failed ones do not count; a resume
    waiting to run holds the place in the budget of the trial it continues."""
    finished = running = resumes = 0
    for t in study.get_trials(deepcopy=False):
        finished += t.state in FINISHED
        running += t.state == TrialState.RUNNING
        resumes += t.state == TrialState.WAITING and RESUMES in t.user_attrs
    return finished, running, resumes


def _surplus(study: optuna.Study, spec: SweepSpec, trial: optuna.Trial) -> bool:
    """Whether trials started before ours already fill the budget: workers that asked at the same moment
    each saw room for one more. The lower trial numbers keep their places."""
    if RESUMES in trial.user_attrs:
        return False  # it holds the place of the trial it continues
    taken = sum(t.state in FINISHED
                or (t.state == TrialState.RUNNING and t.number < trial.number)
                or (t.state == TrialState.WAITING and RESUMES in t.user_attrs) for t in study.get_trials(deepcopy=False))
    return taken >= spec.n_trials


def _stop_reason(study, spec, platform: Platform, finished: int, ran: int, max_trials: int | None,
                 stop: StopRequest) -> str | None:
    if stop.reason is not None:
        return stop.reason
    if finished >= spec.n_trials:
        return f"the study's budget of {spec.n_trials} trials is met"
    if max_trials is not None and ran >= max_trials:
        return f"ran --max-trials {max_trials}"
    estimate = estimated_trial_seconds(study, platform.gpu_name) or 0
    if platform.seconds_left() < estimate * 1.2 + DEADLINE_MARGIN_S:
        return f"the session deadline is {platform.seconds_left() / 60:.0f} min away, too close for another trial"
    return None


class StopRequest:
    """Why this worker must leave mid-trial: SIGTERM, Ctrl-C (a second one interrupts at once), or the deadline."""

    def __init__(self, platform: Platform):
        self.platform = platform
        self.reason: str | None = None

    def __call__(self) -> str | None:
        if self.reason is None and self.platform.seconds_left() < DEADLINE_MARGIN_S:
            self.reason = f"the session deadline is {max(self.platform.seconds_left(), 0) / 60:.0f} min away"
        return self.reason

    @contextmanager
    def signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may set handlers; a worker in a thread leaves at the deadline only
            return

        def on_signal(signum, frame):
            if signum == signal.SIGINT and self.reason is not None:
                raise KeyboardInterrupt
            self.reason = f"{signal.Signals(signum).name} received"

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _tell_failed(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(RESULT, {"fail_reason": reason})
    study.tell(trial, state=TrialState.FAIL)


def _trial_folder(study: optuna.Study, trial: optuna.Trial) -> str:
    """trial-0012; on a drive store, where numbers are each worker's own, the trial's origin: trial-ana-1a2b3c4d-3."""
    key = trial_key(study._storage.get_trial(trial._trial_id))
    return f"trial-{key:04d}" if isinstance(key, int) else "trial-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", key)


def _resume_into(trial_dir: Path, resume_from: str, log: Callable[[str], None]) -> None:
    """Copy the checkpoints of the trial this one continues into its folder, for the trainer to resume from."""
    source = Path(resume_from)
    if not source.is_dir():
        log(f"checkpoint folder {resume_from} is not reachable from this worker (is the checkpoint root shared?); "
            "starting from step 0")
        return
    if source.name.startswith("step-"):  # one checkpoint (a finished trial's result names its last)
        shutil.copytree(source, trial_dir / source.name, dirs_exist_ok=True)
    elif source.resolve() != trial_dir.resolve():  # a trial's folder: its latest checkpoints
        shutil.copytree(source, trial_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    log(f"resuming from the checkpoints in {resume_from}")


def run_worker(url: str, study: str | None = None, *, max_trials: int | None = None, account: str | None = None,
               checkpoint_root: str | None = None, deadline_hours: float | None = None,
               precision: str | None = None, allow_cpu: bool = False,
               log: Callable[[str], None] = print) -> WorkerSummary:
    """Join a study (None: the store's only one) and run trials until its budget is met, max_trials ran,
    or the session ends (deadline, SIGTERM, Ctrl-C: the running trial is checkpointed and handed over).
    On Colab and Kaggle it refuses to start without a GPU unless allow_cpu."""
    from runner.train import Preempted, prepare_data, quiet_libraries, result_attrs, run_trial

    quiet_libraries()
    platform = detect(account, checkpoint_root, deadline_hours)
    require_gpu(platform, allow_cpu)
    summary = WorkerSummary(f"{platform.account}/{uuid.uuid4().hex[:8]}")
    worker_seed = zlib.crc32(summary.worker_id.encode())
    store = open_store(url)
    optuna_study, spec = load_study(store, study, worker_seed=worker_seed)
    study = optuna_study.study_name
    train = run_trial
    show_bars = watched()  # one process trains: its steps can be shown as they go
    if spec.gpus_per_trial > 1:
        from runner import parallel

        if len(devices := parallel.trial_devices(spec.gpus_per_trial)) > 1:
            train, show_bars = functools.partial(parallel.run_trial_parallel, devices=devices), False
            platform = dataclasses.replace(platform, gpu_name=f"{len(devices)} x {platform.gpu_name}")  # own timings
    store.join(summary.worker_id)
    log(f"worker {summary.worker_id} on {platform.name} ({platform.gpu_name}) joins study {study!r}")
    if not shared_checkpoints(platform):
        log(f"checkpoints go to {platform.checkpoint_root}, which only this machine sees: a trial killed here "
            "restarts from step 0 elsewhere" + (" (a checkpoint_root under /content/drive shares them)"
                                                 if platform.name == "colab" else ""))
    identity = {"id": summary.worker_id, "account": platform.account, "platform": platform.name, "gpu": platform.gpu_name}
    try:
        sweep_data = prepare_data(spec)
    except SweeperError as e:  # the model or the data is not there: say so in the store, not only here
        record_worker_stop(optuna_study, identity, str(e))
        raise
    log(f"data: {len(sweep_data.train)} train and {len(sweep_data.eval)} eval sequences of {spec.model.max_seq_len} tokens")

    failures_in_a_row = 0
    gpu_seconds = 0.0
    heartbeat_s, lag_s = store.lease_timing(spec.heartbeat_s)
    watcher = Watcher(heartbeat_s, lag_s=lag_s)
    stop = StopRequest(platform)
    lease = {"worker": summary.worker_id, "account": platform.account, "platform": platform.name}
    waiting_logged = False

    def views(trial_number: int | None) -> None:
        """The store's views for people, where it keeps any (a sheet's `trials` and `workers`)."""
        store.update_views(optuna_study,
                           {"worker": summary.worker_id, "account": platform.account, "platform": platform.name,
                      "gpu": platform.gpu_name, "trial": trial_number, "gpu_hours": gpu_seconds / 3600})

    def watch_leases(own_trial_id: int) -> None:
        """While our trial trains: note the other leases, so that a dead one is taken over at our next ask."""
        watcher.observe(optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), own={own_trial_id})

    trial = None
    with stop.signals():
        while True:
            try:
                summary.took_over += take_over_stale(optuna_study, watcher, log, by=summary.worker_id)
                finished, running, resumes = _budget(optuna_study)
                if (reason := _stop_reason(optuna_study, spec, platform, finished, len(summary.trials), max_trials,
                                           stop)) is not None:
                    break
                if not resumes and finished + running >= spec.n_trials:  # the rest runs elsewhere: watch it finish
                    if not waiting_logged:
                        log(f"waiting: {running} trials of other workers are running to finish the budget")
                        waiting_logged = True
                    time.sleep(min(heartbeat_s, 30))
                    continue
                waiting_logged = False
                trial = optuna_study.ask()
                params = suggest(trial, spec)
                if _surplus(optuna_study, spec, trial):
                    _tell_failed(optuna_study, trial, "surplus: other workers started the budget's last trials at once")
                    log(f"trial {trial.number} is one too many: other workers started the budget's last trials; "
                        "watching them instead")
                    trial = None
                    time.sleep(min(heartbeat_s, 30))  # let the store show us what the others started
                    continue
                trial.set_user_attr(WORKER, identity)
                summary.trials.append(trial.number)
                log(f"trial {trial.number}: {params}")
                views(trial.number)

                def check_place(trial=trial) -> None:
                    if (lost := store.claim_lost(trial._trial_id)) is not None:
                        raise Superseded(f"claim lost: {lost}")
                    if (why := superseded(optuna_study, trial._trial_id)) is not None:
                        raise Superseded(why)

                def report(k: int, loss: float, trial=trial) -> bool:
                    check_place()
                    trial.report(loss, k)
                    views(trial.number)
                    return trial.should_prune()

                trial_dir = platform.checkpoint_root / study / _trial_folder(optuna_study, trial)
                heartbeat = Heartbeat(optuna_study._storage, trial._trial_id, {**lease, "checkpoint": str(trial_dir)},
                                      heartbeat_s, log, watch=functools.partial(watch_leases, trial._trial_id))
                bar = TrialBar(trial.number) if show_bars else None
                try:
                    check_place()  # a resume whose place another holds stops before it starts
                    if (resume_from := trial.user_attrs.get(RESUME_FROM)) is not None:
                        _resume_into(trial_dir, resume_from, log)
                    shown = {"progress": bar, "log": bar.above(log)} if bar is not None else {"log": log}  # one process
                    result = train(spec, params, trial_dir, sweep_data, report, precision=precision, stop=stop, **shown)
                    check_place()  # once more before the result goes in
                except Preempted as e:
                    heartbeat.stop()
                    frozen = optuna_study._storage.get_trial(trial._trial_id)
                    hand_over(optuna_study, frozen, {RESULT: {"fail_reason": f"preempted: {e.reason}",
                                                                "checkpoint": str(trial_dir)}}, str(trial_dir))
                    log(f"trial {trial.number} preempted ({e.reason}): checkpoint {e.checkpoint} written, "
                        "trial handed over to be resumed")
                    trial = None
                    continue
                except (StoreChanged, UpdateFinishedTrialError):
                    raise
                except Superseded as e:  # not a failure of ours: another record holds the place
                    _tell_failed(optuna_study, trial, str(e))
                    log(f"trial {trial.number} stops: {e}")
                    continue
                except Exception as e:  # whatever the trainer raised fails this trial, in one line, not the worker
                    reason_text = f"{type(e).__name__}: {first_line(e)}"
                    _tell_failed(optuna_study, trial, reason_text)
                    log(f"trial {trial.number} failed: {reason_text}")
                    failures_in_a_row += 1
                    if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                        why = f"{failures_in_a_row} trials failed in a row; last: {reason_text}"
                        record_worker_stop(optuna_study, identity, why)
                        raise SweeperError(why) from None
                    continue
                finally:
                    heartbeat.stop()
                    if bar is not None:
                        bar.close()
                failures_in_a_row = 0
                gpu_seconds += result.wall_time_s * result.gpus
                trial.set_user_attr(RESULT, result_attrs(result))
                if result.pruned_at is not None:
                    optuna_study.tell(trial, state=TrialState.PRUNED)
                    log(f"trial {trial.number} pruned at eval {result.pruned_at} (eval loss {result.eval_loss:.4f})")
                else:
                    optuna_study.tell(trial, result.eval_loss)
                    log(f"trial {trial.number} complete: eval loss {result.eval_loss:.4f}, "
                        f"{result.tokens_per_s:.0f} tok/s, {result.wall_time_s:.1f} s")
                trial = None
                views(None)
            except UpdateFinishedTrialError:
                # Another worker saw our heartbeat stop (a stall longer than the grace) and took the trial over.
                log(f"trial {trial.number if trial else '?'} was taken over by another worker; going on")
                trial = None
            except StoreChanged as e:
                # The shared sheet changed under us (a hand edit, a lost race): start again from what it says now,
                # and fail the trial we held, so it does not sit RUNNING against the budget.
                log(f"{e}; reloading the study")
                store = open_store(url)
                store.join(summary.worker_id)
                optuna_study, spec = load_study(store, study, worker_seed=worker_seed)
                heartbeat_s, lag_s = store.lease_timing(spec.heartbeat_s)  # the spec may have changed too
                watcher.grace_s = grace_s(heartbeat_s, lag_s)
                if trial is not None:
                    held = optuna.trial.Trial(optuna_study, trial._trial_id)  # the same trial, on the reloaded store
                    if optuna_study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                        _tell_failed(optuna_study, held, f"store changed: {e}")
                trial = None
    summary.stop_reason = reason
    log(f"worker {summary.worker_id} stops: {reason}")
    views(None)
    return summary
