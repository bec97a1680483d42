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
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from runner.platform import Platform, detect, require_gpu, shared_checkpoints
from runner.progress import TrialBar, watched
from sweeper.configs import params_text
from sweeper.errors import StoreChanged, SweeperError, first_line
from sweeper.leases import (Heartbeat, Watcher, grace_s, hand_over, record_worker_stop, superseded,
                            take_over_stale)
from sweeper.record import (CARD, FINISHED, RESULT, RESUME_FROM, RESUMES, SEED, WORKER, result_of, trial_key,
                            worker_of)
from sweeper.spec import SweepSpec, spec_from_dict
from sweeper.storage import open_store
from sweeper.study import (changed_fields, checkpoint_folder, load_study, make_pruner, make_sampler, stored_spec,
                           suggest)

MAX_FAILURES_IN_A_ROW = 3
DEADLINE_MARGIN_S = 300  # leave this much of the session for checkpointing and telling


class PreflightFailed(SweeperError):
    """A preflight check failed: the worker stops before any claim. Exit 2 where what was asked for is what fails (a
    precision the GPU lacks), else 1."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def preflight_failure(card: dict[str, Any]) -> PreflightFailed | None:
    """The error a failed machine card stops a worker with, naming the check; None for a card that passed."""
    failed = next((c for c in card["checks"] if c["status"] == "fail"), None)
    if failed is None:
        return None
    return PreflightFailed(f"preflight failed: {failed['name']}: {failed['detail']}", card.get("exit_code", 1))


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


def prefer_resumes(study: optuna.Study, root: Path) -> None:
    """Make this study's ask take resumes before fresh points, and first the resumes whose checkpoints are on this
    worker's disk (its own handed-over trials: a restarted worker continues where it stopped). Optuna's ask pops the
    oldest waiting trial (Study._pop_waiting_trial_id, optuna 5.1): this is that loop over the waiting trials in our
    order, each claimed by the same atomic RUNNING write."""
    def pop_waiting_trial_id() -> int | None:
        waiting = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
        for trial in sorted(waiting, key=lambda t: (claim_rank(t, root), t.number)):
            try:
                if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    return trial._trial_id
            except UpdateFinishedTrialError:
                continue  # another worker took it and finished it meanwhile
        return None

    study._pop_waiting_trial_id = pop_waiting_trial_id


def claim_rank(trial: optuna.trial.FrozenTrial, root: Path) -> int:
    """0: a resume whose checkpoint folder is on this worker's disk, under its checkpoint root; 1: another resume;
    2: a fresh point."""
    if RESUMES not in trial.user_attrs:
        return 2
    source = trial.user_attrs.get(RESUME_FROM)
    here = isinstance(source, str) and Path(source).is_dir() and Path(source).resolve().is_relative_to(root.resolve())
    return 0 if here else 1


def _resume_into(trial_dir: Path, resume_from: str, root: Path, log: Callable[[str], None]) -> None:
    """Copy the checkpoints of the trial this one continues into its folder, for the trainer to resume from. The path
    comes from the shared store, which any of its editors can write: only a folder under this worker's checkpoint
    root is read."""
    source = Path(resume_from)
    if not source.resolve().is_relative_to(root.resolve()):
        log(f"checkpoint folder {resume_from} is outside this worker's checkpoint root {root}: not read; starting "
            "from step 0")
        return
    if not source.is_dir():
        log(f"checkpoint folder {resume_from} is not reachable from this worker (is the checkpoint root shared?); "
            "starting from step 0")
        return
    if source.name.startswith("step-"):  # one checkpoint (a finished trial's result names its last)
        shutil.copytree(source, trial_dir / source.name, dirs_exist_ok=True)
    elif source.resolve() != trial_dir.resolve():  # a trial's folder: its latest checkpoints
        shutil.copytree(source, trial_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    log(f"resuming from the checkpoints in {resume_from}")


@dataclass
class Session:
    """What the worker's loop and each of its trials share: the store, the study and its spec, this worker."""

    url: str
    store: Any
    study: optuna.Study
    spec: SweepSpec
    platform: Platform
    summary: WorkerSummary
    trainer: Any
    train: Callable[..., Any]
    """The trainer's run_trial, bound to what this worker keeps across trials (its base model, or its GPUs)."""
    sweep_data: Any
    watcher: Watcher
    stop: StopRequest
    heartbeat_s: float
    show_bars: bool
    precision: str | None
    log: Callable[[str], None]
    worker_seed: int
    check: Callable[..., dict[str, Any]]
    """The preflight, bound to what this worker trains with (runner/doctor.py)."""
    followed: dict[str, Any] | None = None
    """The spec as the study held it when this worker last read it."""
    gpu_seconds: float = 0.0
    failures_in_a_row: int = 0

    @property
    def identity(self) -> dict[str, str]:
        return {"id": self.summary.worker_id, "account": self.platform.account, "platform": self.platform.name,
                "gpu": self.platform.gpu_name}

    def views(self, trial_number: int | None) -> None:
        """The store's views for people, where it keeps any (a sheet's `trials` and `workers`)."""
        self.store.update_views(self.study, {"worker": self.summary.worker_id, "account": self.platform.account,
                                             "platform": self.platform.name, "gpu": self.platform.gpu_name,
                                             "trial": trial_number, "gpu_hours": self.gpu_seconds / 3600})

    def watch_leases(self, own_trial_id: int) -> None:
        """While our trial trains: note the other leases, so that a dead one is taken over at our next ask."""
        self.watcher.observe(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), own={own_trial_id})

    def check_place(self, trial: optuna.Trial) -> None:
        if (lost := self.store.claim_lost(trial._trial_id)) is not None:
            raise Superseded(f"claim lost: {lost}")
        if (why := superseded(self.study, trial._trial_id)) is not None:
            raise Superseded(why)

    def reload(self, study_name: str) -> None:
        """The study as the store says now (after it changed under us); the spec may have changed too."""
        self.store = open_store(self.url)
        self.store.join(self.summary.worker_id)
        self.study, self.spec = load_study(self.store, study_name, worker_seed=self.worker_seed)
        self.followed = stored_spec(self.study)
        prefer_resumes(self.study, self.platform.checkpoint_root)
        self.heartbeat_s, lag_s = self.store.lease_timing(self.spec.heartbeat_s)
        self.watcher.grace_s = grace_s(self.heartbeat_s, lag_s)

    def follow_spec(self) -> None:
        """Take up the spec the study holds now, if `sweeper init --overwrite` replaced it since: a raised budget,
        another pruner or sampler, new timings count from this worker's next ask. A trial already running keeps the
        spec it started with. Another model or data means new sequences, and the preflight again."""
        stored = stored_spec(self.study)
        if stored is None or stored == self.followed:
            return
        old, self.spec = self.spec, spec_from_dict(stored, source=f"spec stored in study {self.study.study_name!r}")
        self.followed = stored
        self.log(f"the study's spec changed ({', '.join(changed_fields(old.to_dict(), self.spec.to_dict()))}): "
                 "following it from this worker's next trial")
        self.study.sampler, self.study.pruner = make_sampler(self.spec, self.worker_seed), make_pruner(self.spec)
        self.heartbeat_s, lag_s = self.store.lease_timing(self.spec.heartbeat_s)
        self.watcher.grace_s = grace_s(self.heartbeat_s, lag_s)
        if (old.model, old.data, old.budget, old.train.seed) != (self.spec.model, self.spec.data, self.spec.budget,
                                                                 self.spec.train.seed):
            self.sweep_data = self.trainer.prepare_data(self.spec)
        if old.model != self.spec.model:
            preflight(self)


def run_one_trial(session: Session, trial: optuna.Trial, params: dict[str, Any]) -> None:
    """Train one claimed trial and tell the study how it ended: complete, pruned, failed, or handed over to be
    resumed (preempted). Raises StoreChanged and UpdateFinishedTrialError (the trial taken over) to the loop, and
    SweeperError when MAX_FAILURES_IN_A_ROW trials failed in a row."""
    s, study, log = session, session.study, session.log
    # A repeat (and a resume of one: suggest gave it the seed) runs to the end: only complete runs enter its
    # config's mean and the pooled noise, so pruning unlucky seeds would make both come out too low.
    repeat = SEED in trial.user_attrs

    def report(k: int, loss: float) -> bool:
        s.check_place(trial)
        trial.report(loss, k)
        s.views(trial.number)
        return not repeat and trial.should_prune()

    trial_dir = s.platform.checkpoint_root / checkpoint_folder(study) / _trial_folder(study, trial)
    lease = {"worker": s.summary.worker_id, "account": s.platform.account, "platform": s.platform.name,
             "checkpoint": str(trial_dir)}
    heartbeat = Heartbeat(study._storage, trial._trial_id, lease, s.heartbeat_s, log,
                          watch=functools.partial(s.watch_leases, trial._trial_id))
    bar = TrialBar(trial.number) if s.show_bars else None

    def progress(step: int, total: int, tokens_per_s: float, eval_loss: float | None) -> None:
        heartbeat.progress(step, total)
        if bar is not None:
            bar(step, total, tokens_per_s, eval_loss)

    try:
        s.check_place(trial)  # a resume whose place another holds stops before it starts
        if (resume_from := trial.user_attrs.get(RESUME_FROM)) is not None:
            _resume_into(trial_dir, resume_from, s.platform.checkpoint_root, log)
        result = s.train(s.spec, params, trial_dir, s.sweep_data, report, precision=s.precision, stop=s.stop,
                         progress=progress, log=bar.above(log) if bar is not None else log)
        s.check_place(trial)  # once more before the result goes in
    except s.trainer.Preempted as e:
        heartbeat.stop()
        frozen = study._storage.get_trial(trial._trial_id)
        hand_over(study, frozen, {RESULT: {"fail_reason": f"preempted: {e.reason}", "checkpoint": str(trial_dir)}},
                  str(trial_dir))
        log(f"trial {trial.number} preempted ({e.reason}): checkpoint {e.checkpoint} written, "
            "trial handed over to be resumed")
        return
    except (StoreChanged, UpdateFinishedTrialError):
        raise
    except Superseded as e:  # not a failure of ours: another record holds the place
        _tell_failed(study, trial, str(e))
        log(f"trial {trial.number} stops: {e}")
        return
    except Exception as e:  # whatever the trainer raised fails this trial, in one line, not the worker
        reason_text = f"{type(e).__name__}: {first_line(e)}"
        _tell_failed(study, trial, reason_text)
        log(f"trial {trial.number} failed: {reason_text}")
        s.failures_in_a_row += 1
        if s.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            why = f"{s.failures_in_a_row} trials failed in a row; last: {reason_text}"
            record_worker_stop(study, s.identity, why)
            raise SweeperError(why) from None
        return
    finally:
        heartbeat.stop()
        if bar is not None:
            bar.close()
    s.failures_in_a_row = 0  # a diverged trial too: a result, not a failure
    s.gpu_seconds += result.wall_time_s * result.gpus
    log(tell_result(study, trial, result, s.trainer.result_attrs(result)))
    s.views(None)


def tell_result(study: optuna.Study, trial: optuna.Trial, result: Any, attrs: dict[str, Any]) -> str:
    """Write a trained trial's result and tell the study how it ended: complete, pruned, or diverged; the log line.

    A diverged trial (its loss became NaN or inf: fp16 at the top of a learning-rate range) is told PRUNED, the
    state the samplers learn from: TPE ranks pruned trials below every complete one (by the eval they reached), and
    leaves FAIL out. Optuna gives it its last reported (finite) eval loss as value."""
    trial.set_user_attr(RESULT, attrs)
    if result.diverged:
        study.tell(trial, state=TrialState.PRUNED)
        last = f"; last eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        return f"trial {trial.number} diverged: {result.diverged}{last}"
    if result.pruned_at is not None:
        study.tell(trial, state=TrialState.PRUNED)
        return f"trial {trial.number} pruned at eval {result.pruned_at} (eval loss {result.eval_loss:.4f})"
    study.tell(trial, result.eval_loss)
    return (f"trial {trial.number} complete: eval loss {result.eval_loss:.4f}, {result.tokens_per_s:.0f} tok/s, "
            f"{result.wall_time_s:.1f} s")


def preflight(session: Session) -> None:
    """Check the device before any claim (runner/doctor.py) and write the result as this worker's machine card; a
    failed check stops the worker in one line, recorded in the store, with no trial touched."""
    s = session
    s.log(f"preflight on {s.platform.gpu_name}: checking the device with the study's model")
    try:
        card = s.check(s.spec, s.sweep_data, precision=s.precision, log=s.log)
    except SweeperError as e:  # its process died (a trial on several GPUs checks in a process of its own)
        record_worker_stop(s.study, s.identity, str(e))
        raise
    card["worker"] = s.identity
    s.study.set_user_attr(CARD + s.summary.worker_id, card)
    if (error := preflight_failure(card)) is not None:
        record_worker_stop(s.study, s.identity, str(error))
        raise error
    s.log(f"preflight passed in {card['seconds']:.0f} s: {card['precision']}, micro-batch {card['micro_batch']}, "
          + ("fused kernels on" if card["fused"] else f"fused kernels off ({card['fused_note']})"))


def run_worker(url: str, study: str | None = None, *, max_trials: int | None = None, account: str | None = None,
               checkpoint_root: str | None = None, deadline_hours: float | None = None,
               precision: str | None = None, allow_cpu: bool = False,
               log: Callable[[str], None] = print, trainer: Any = None) -> WorkerSummary:
    """Join a study (None: the store's only one) and run trials until its budget is met, max_trials ran,
    or the session ends (deadline, SIGTERM, Ctrl-C: the running trial is checkpointed and handed over).
    On Colab and Kaggle it refuses to start without a GPU unless allow_cpu. `trainer`: what trains a trial
    (None: runner.train; tests pass a fast one): its quiet_libraries, prepare_data, BaseModel, preflight, run_trial,
    result_attrs and Preempted. Before its first claim the worker checks its device (the preflight) and writes its
    machine card; a failed check stops it there."""
    if trainer is None:
        from runner import train as trainer

    trainer.quiet_libraries()
    platform = detect(account, checkpoint_root, deadline_hours)
    require_gpu(platform, allow_cpu)
    summary = WorkerSummary(f"{platform.account}/{uuid.uuid4().hex[:8]}")
    worker_seed = zlib.crc32(summary.worker_id.encode())
    store = open_store(url)
    optuna_study, spec = load_study(store, study, worker_seed=worker_seed)
    study = optuna_study.study_name
    # The base model is loaded by the preflight (or the first trial) and kept for the others (fresh adapters each time).
    base = trainer.BaseModel()
    train, show_bars = functools.partial(trainer.run_trial, base=base), watched()
    check = functools.partial(trainer.preflight, base=base)
    if spec.gpus_per_trial > 1:
        from runner import parallel

        if len(devices := parallel.trial_devices(spec.gpus_per_trial)) > 1:
            train, show_bars = functools.partial(parallel.run_trial_parallel, devices=devices), False
            check = functools.partial(parallel.preflight_apart, device=devices[0])
            platform = dataclasses.replace(platform, gpu_name=f"{len(devices)} x {platform.gpu_name}")  # own timings
    store.join(summary.worker_id)
    log(f"worker {summary.worker_id} on {platform.name} ({platform.gpu_name}) joins study {study!r}")
    if not shared_checkpoints(platform):
        log(f"checkpoints go to {platform.checkpoint_root}, which only this machine sees: a trial killed here "
            "restarts from step 0 elsewhere" + (" (a checkpoint_root under /content/drive shares them)"
                                                 if platform.name == "colab" else ""))
    heartbeat_s, lag_s = store.lease_timing(spec.heartbeat_s)
    prefer_resumes(optuna_study, platform.checkpoint_root)
    session = Session(url, store, optuna_study, spec, platform, summary, trainer, train, None,
                      Watcher(heartbeat_s, lag_s=lag_s), StopRequest(platform), heartbeat_s, show_bars, precision, log,
                      worker_seed, check, stored_spec(optuna_study))
    try:
        session.sweep_data = trainer.prepare_data(spec)
    except SweeperError as e:  # the model or the data is not there: say so in the store, not only here
        record_worker_stop(optuna_study, session.identity, str(e))
        raise
    log(f"data: {len(session.sweep_data.train)} train and {len(session.sweep_data.eval)} eval sequences of "
        f"{spec.model.max_seq_len} tokens")
    preflight(session)

    waiting_logged = False
    trial, s = None, session
    with s.stop.signals():
        while True:
            try:
                s.follow_spec()
                summary.took_over += take_over_stale(s.study, s.watcher, log, by=summary.worker_id)
                finished, running, resumes = _budget(s.study)
                if (reason := _stop_reason(s.study, s.spec, platform, finished, len(summary.trials), max_trials,
                                           s.stop)) is not None:
                    break
                if not resumes and finished + running >= s.spec.n_trials:  # the rest runs elsewhere: watch it finish
                    if not waiting_logged:
                        log(f"waiting: {running} trials of other workers are running to finish the budget")
                        waiting_logged = True
                    time.sleep(min(s.heartbeat_s, 30))
                    continue
                waiting_logged = False
                trial = s.study.ask()
                params = suggest(trial, s.spec)
                if _surplus(s.study, s.spec, trial):
                    _tell_failed(s.study, trial, "surplus: other workers started the budget's last trials at once")
                    log(f"trial {trial.number} is one too many: other workers started the budget's last trials; "
                        "watching them instead")
                    trial = None
                    time.sleep(min(s.heartbeat_s, 30))  # let the store show us what the others started
                    continue
                trial.set_user_attr(WORKER, s.identity)
                summary.trials.append(trial.number)
                log(f"trial {trial.number}: {params_text(params)}")
                s.views(trial.number)
                run_one_trial(s, trial, params)
                trial = None
            except UpdateFinishedTrialError:
                # Another worker saw our heartbeat stop (a stall longer than the grace) and took the trial over.
                log(f"trial {trial.number if trial else '?'} was taken over by another worker; going on")
                trial = None
            except StoreChanged as e:
                # The shared sheet changed under us (a hand edit, a lost race): start again from what it says now,
                # and fail the trial we held, so it does not sit RUNNING against the budget.
                log(f"{e}; reloading the study")
                s.reload(study)
                if trial is not None:
                    held = optuna.trial.Trial(s.study, trial._trial_id)  # the same trial, on the reloaded store
                    if s.study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                        _tell_failed(s.study, held, f"store changed: {e}")
                trial = None
    summary.stop_reason = reason
    log(f"worker {summary.worker_id} stops: {reason}")
    session.views(None)
    return summary
