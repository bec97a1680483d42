"""Leases on running trials, on every store: heartbeats, staleness judged on the observer's clock, takeover.

Optuna's own heartbeat is RDB-only and runs only inside study.optimize (docs/design.md), so:
- A running trial's lease is its system attr LEASE: worker, account, platform, checkpoint folder and a
  beat counter, rewritten every heartbeat_s by a background thread (`Heartbeat`): one store write, the
  same on every store (an attr op on a journal or sheet, a row on a server, our own shard on Drive).
- Staleness is judged on the observer's own clock (`Watcher`): a lease is stale once its beat has not
  changed for GRACE_BEATS heartbeats since this process first saw it, so no clock skew between
  machines can make a live trial stale; a worker that just joined waits the whole grace first. A worker
  keeps watching the leases while it trains (its heartbeat thread reads them after each beat), so the
  first worker to ask after the grace takes a dead trial over. The beat also carries the writer's wall
  time ("at") and when the trial began on that clock ("since"), for the report's lease age and GPU-hours only,
  and the trial's step of total steps.
- `take_over` fails a stale trial (the store lets exactly one writer finish a trial; a second taker's
  write is refused) and enqueues its params again with RESUME_FROM naming its checkpoint folder and
  RESUMES the trial it continues; the worker that pops it resumes from that checkpoint.
- A worker leaving mid-trial (deadline, SIGTERM, Ctrl-C) hands its trial over the same way at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from sweeper.errors import UserError, first_line
from sweeper.record import (FINISHED, LEASE, RESUME_FROM, RESUMES, STALE_REASON, TAKEOVER, WORKER_STOPPED,
                            fail_reason, lease_of, params_of, result_of, resumed_from, trial_key)
GRACE_BEATS = 3
NOT_RETRIED = ("surplus:", "claim lost:")  # failures that lost nothing: another trial holds the place
# (a drive claim that lost is failed "claim lost: ..." by whoever finds out: the worker or the store's own settle)


def record_worker_stop(study: optuna.Study, worker: dict[str, Any], reason: str) -> None:
    """Say in the store why a worker gave up (a model it cannot load, trials failing in a row), for the whole team."""
    try:
        study.set_user_attr(WORKER_STOPPED + worker["id"], {**worker, "reason": reason, "at": time.time()})
    except Exception:  # noqa: BLE001  the store may be what failed; the worker's own error is the one to raise
        pass


def stopped_workers(study: optuna.Study) -> list[str]:
    """One line per worker that gave up, oldest first."""
    stops = sorted((v for k, v in study.user_attrs.items() if k.startswith(WORKER_STOPPED)), key=lambda v: v["at"])
    return [f"worker {s['id']} ({s['account']}, {s['platform']}, {s['gpu']}) stopped: {s['reason']}" for s in stops]


def grace_s(heartbeat_s: float, lag_s: float = 0.0) -> float:
    """How long a lease may stay unchanged before its trial counts as dead: GRACE_BEATS beats, plus how late the
    store shows other workers' writes (a drive folder: minutes)."""
    return GRACE_BEATS * heartbeat_s + lag_s


def silence(seconds: float) -> str:
    """12 s, 3 min, 2.5 h."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def lease_note(trial: FrozenTrial, grace: float, now: float | None = None) -> str:
    """For the report: how old a running trial's lease is, by the writer's clock, and whether it is past the grace."""
    at = lease_of(trial).get("at")
    if trial.state != TrialState.RUNNING or not isinstance(at, (int, float)):
        return ""
    age = max(0.0, (time.time() if now is None else now) - at)
    late = f", past the {silence(grace)} grace: the next worker to ask takes it over" if age > grace else ""
    return f"lease {silence(age)} old{late}"


class Heartbeat:
    """Rewrites a running trial's lease every interval_s from a background thread, until stopped or the
    trial is finished (by us, or by a worker that took it over). After each beat it calls `watch` (the worker
    observing the other leases), so watching costs no thread of its own."""

    def __init__(self, storage: Any, trial_id: int, lease: dict[str, Any], interval_s: float,
                 log: Callable[[str], None] = print, watch: Callable[[], None] | None = None):
        self.storage, self.trial_id, self.interval_s, self.log = storage, trial_id, interval_s, log
        self.lease = {**lease, "since": time.time()}  # when this run of the trial began, on the writer's clock
        self.watch = watch
        self.beats = 0
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="sweeper-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> bool:
        self.beats += 1
        try:
            self.storage.set_trial_system_attr(self.trial_id, LEASE, {**self.lease, "beat": self.beats, "at": time.time()})
        except UpdateFinishedTrialError:
            return False  # finished, here or by a takeover: nothing left to keep alive
        except Exception as e:  # a store hiccup must not kill the trial; the next beat tries again
            self.log(f"heartbeat failed: {type(e).__name__}: {first_line(e)}")
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._beat():
                return
            if self.watch is not None and not self._stop.is_set():  # stopping: the trial's tell must not wait
                try:
                    self.watch()
                except Exception as e:  # noqa: BLE001  watching is a courtesy to the others; the trial goes on
                    self.log(f"watching the leases failed: {type(e).__name__}: {first_line(e)}")

    def progress(self, step: int, total_steps: int) -> None:
        """The trial's progress, written with the next beat (the report shows how far a running trial is)."""
        self.lease = {**self.lease, "step": step, "total_steps": total_steps}  # one assignment: the beat reads whole

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Watcher:
    """Which running trials are stale, on this process's clock: beat unchanged for the grace (GRACE_BEATS x
    interval_s, plus the store's lag). `observe` may be called from the heartbeat thread while `stale` runs in the
    worker's loop."""

    def __init__(self, interval_s: float, lag_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.grace_s = grace_s(interval_s, lag_s)
        self.clock = clock
        self._seen: dict[int | str, tuple[Any, float]] = {}  # trial key -> (beat, when we saw it change)
        self._lock = threading.Lock()

    def observe(self, trials: list[FrozenTrial], own: set[int] = frozenset()) -> None:
        """Note each running trial's beat, and when it last changed; forget trials no longer running."""
        now, running = self.clock(), set()
        with self._lock:
            for t in trials:
                if t.state != TrialState.RUNNING or t._trial_id in own:
                    continue
                key = trial_key(t)
                running.add(key)
                beat = lease_of(t).get("beat")
                if key not in self._seen or self._seen[key][0] != beat:
                    self._seen[key] = (beat, now)
            self._seen = {k: v for k, v in self._seen.items() if k in running}

    def silent_s(self, trial: FrozenTrial) -> float:
        """Seconds since this process saw the trial's beat change (0 for a trial it has not seen)."""
        with self._lock:
            seen = self._seen.get(trial_key(trial))
        return 0.0 if seen is None else self.clock() - seen[1]

    def stale(self, trials: list[FrozenTrial], own: set[int] = frozenset()) -> list[FrozenTrial]:
        self.observe(trials, own)
        return [t for t in trials if t.state == TrialState.RUNNING and t._trial_id not in own
                and self.silent_s(t) >= self.grace_s]


def hand_over(study: optuna.Study, trial: FrozenTrial, attrs: dict[str, Any], checkpoint: str | None) -> bool:
    """Fail `trial`, with user attrs saying why, and enqueue its params again, to resume from `checkpoint`. False
    when another worker finished or took the trial first (the store refuses our write).

    The resume is enqueued before the trial is failed, and only if none is there yet: a worker killed in between
    leaves a running trial that the next taker fails, finding its resume there, never a failed trial without
    one. Two takers racing may each enqueue one: `superseded` lets one run."""
    storage, key = study._storage, trial_key(trial)
    try:
        for name, value in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, name, value)
        if not any(t.user_attrs.get(RESUMES) == key and t.state != TrialState.FAIL for t in study.get_trials(deepcopy=False)):
            enqueue_resume(study, trial, checkpoint)
        return storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False


def enqueue_resume(study: optuna.Study, trial: FrozenTrial, checkpoint: str | None) -> None:
    """Enqueue a trial with `trial`'s params that continues it (from `checkpoint`, if given)."""
    params = params_of(trial)
    user_attrs = {RESUMES: trial_key(trial)}
    if checkpoint:
        user_attrs[RESUME_FROM] = checkpoint
    study.enqueue_trial(params, user_attrs=user_attrs)


def superseded(study: optuna.Study, trial_id: int) -> str | None:
    """Why a resume must stop, or None (and for a trial that resumes nothing): the trial it continues finished
    after all (its worker was slow, not dead: its result stands), or a resume of the same trial with a lower
    number is alive (two takers raced; every worker picks the same one). On a drive store, where numbers are
    each worker's own, claims on the resume settle the second case (the store's claim_lost hook)."""
    me = study._storage.get_trial(trial_id)
    key = me.user_attrs.get(RESUMES)
    if key is None:
        return None
    trials = study.get_trials(deepcopy=False)
    original = next((t for t in trials if trial_key(t) == key), None)
    if original is not None and original.state in FINISHED:
        return f"surplus: trial {original.number}, which this one resumes, finished after all"
    if isinstance(key, int):
        rival = next((t for t in trials if t.user_attrs.get(RESUMES) == key and t.state != TrialState.FAIL
                      and t.number < me.number), None)
        if rival is not None:
            return f"surplus: trial {rival.number} resumes trial {key} too"
    return None


def not_retried(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The failed trials that nothing resumes, leaving out failures that lost nothing (NOT_RETRIED)."""
    resumed = {t.user_attrs.get(RESUMES) for t in trials}
    return [t for t in trials if t.state == TrialState.FAIL and trial_key(t) not in resumed
            and not fail_reason(t).startswith(NOT_RETRIED)]


def retry(study: optuna.Study, numbers: list[int] | None) -> list[tuple[int, str]]:
    """`sweeper retry`: enqueue the given finished trials again (None: every failed one not yet resumed),
    each resuming from its last checkpoint where it left one. Returns (number, checkpoint or ''). A trial that was
    resumed already is not enqueued twice: where its resume finished or is under way, it is refused; where the
    resume failed too, that last failed link is the one retried (its checkpoint is the newest)."""
    trials = study.get_trials(deepcopy=False)
    if numbers is None:
        chosen = not_retried(trials)
    else:
        by_number = {t.number: t for t in trials}
        missing = [n for n in numbers if n not in by_number]
        if missing:
            raise UserError(f"no trial {', '.join(map(str, missing))} in study {study.study_name!r}")
        chosen = [latest_link(trials, by_number[n]) for n in numbers]
        running = [t.number for t in chosen if not t.state.is_finished()]
        if running:
            raise UserError(f"trial {', '.join(map(str, running))} has not finished; only finished trials are retried")
    done = []
    for t in chosen:
        checkpoint = result_of(t).get("checkpoint") or lease_of(t).get("checkpoint")
        if t.state == TrialState.COMPLETE:
            checkpoint = None  # resuming a finished run would only repeat its end: run it afresh
        enqueue_resume(study, t, checkpoint)
        done.append((t.number, checkpoint or ""))
    return done


def latest_link(trials: list[FrozenTrial], trial: FrozenTrial) -> FrozenTrial:
    """The last trial of `trial`'s resume chain (the lowest-numbered resume at each link, the one that runs), when
    that is a failed one to retry; a UserError naming the link that finished or is under way."""
    resumes: dict[int | str, list[FrozenTrial]] = {}
    for t in trials:
        if (key := t.user_attrs.get(RESUMES)) is not None:
            resumes.setdefault(key, []).append(t)
    at, seen = trial, {trial.number}
    while (later := [t for t in resumes.get(trial_key(at), []) if t.number not in seen]):
        at = min(later, key=lambda t: t.number)
        seen.add(at.number)
    if at is trial:
        return trial
    state = at.state.name.lower()
    if at.state in FINISHED:
        raise UserError(f"trial {trial.number} was resumed as #{at.number}, which is {state}: its result stands "
                        f"(sweeper enqueue --repeat runs its config again)")
    if not at.state.is_finished():
        raise UserError(f"trial {trial.number} is being resumed as #{at.number} ({state})")
    return at


def take_over_stale(study: optuna.Study, watcher: Watcher, log: Callable[[str], None], by: str = "") -> int:
    """Take over every trial this watcher finds stale (called between trials: none is ours); returns how many.
    `by`: the taking worker's id, recorded with the takeover's time and the silence it saw."""
    taken = 0
    for trial in watcher.stale(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        lease = lease_of(trial)
        silent = watcher.silent_s(trial)
        reason = f"stale: no heartbeat from worker {lease.get('worker', '?')} for {silence(silent)} (taken over)"
        # Its own keys, not RESULT: should the worker finish after all, its result must survive this write.
        attrs = {STALE_REASON: reason, TAKEOVER: {"by": by, "at": time.time(), "silent_s": round(silent, 3)}}
        if hand_over(study, trial, attrs, lease.get("checkpoint")):
            taken += 1
            log(f"trial {trial.number} was {reason}; enqueued to resume from {lease.get('checkpoint') or 'the start'}")
    return taken


def chains(trials: list[FrozenTrial]) -> dict[int, str]:
    """Report notes: trial number -> "resumes #12" / "resumed as #31", from the RESUMES attrs."""
    notes: dict[int, list[str]] = {}
    for number, back in resumed_from(trials).items():
        notes.setdefault(number, []).append(f"resumes #{back.number}")
        notes.setdefault(back.number, []).append(f"resumed as #{number}")
    return {n: ", ".join(v) for n, v in notes.items()}
