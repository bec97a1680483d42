"""drive:///content/drive/MyDrive/sweeps/NAME: one SQLite shard per worker in a synced folder, merged on read.

Colab's Drive mount writes to a per-VM cache and syncs minutes later, and no lock is seen across
machines (docs/design.md), so no file here is ever written by two processes:
- The first write of a process creates its shard, `<shard id>.db` (Optuna's own SQLite schema), kept
  on local disk and published to the folder after every write (SQLite backup to a local snapshot,
  copy to a hidden temp file, fsync, rename). A process that only reads (report, best) writes nothing.
- The storage is an in-memory view of the whole sweep: the process's own trials plus every other
  shard's, re-read when a shard's (mtime, size, inode) changes, at most every sync_s. A foreign trial
  keeps its origin ("<shard>#<number>", system attr ORIGIN), so it is counted once however often it is
  read; trial numbers are each view's own. A shard numbers each study's trials from 0, so an origin names a
  trial within its study: the view keys what it tracks by (study, origin). The sampler and the pruner see the whole sweep, late by
  however long Drive takes.
- Enqueued points (WAITING trials without a CLAIM attr) are claimed by running a trial whose CLAIM
  attr names the point (its origin; for a resume, "resume:" + the trial it continues, so that of
  several workers' resumes of one stale trial one runs). Optuna's ask popping another worker's point
  makes a RUNNING claim in our shard, publishes it, waits settle_s and re-reads. Of a point's
  claimants every worker picks the same winner: a finished claim first, then the lowest shard id. A
  loser learns it at the settle or later (`drop_lost_claim`, checked at every eval) and stops; its
  trial fails with LOST set. Lag can waste work; it never loses a result. Claims that raced past each
  other all the way to the end are marked in the report (`duplicate_claims`).
- Writing another worker's trial (a takeover failing a stale one, sweeper/leases.py) records an
  override in our shard (study system attr OVERRIDE + origin) that every view applies; the owner, if
  alive, fails the trial in its own shard when it sees it; if it finished first, its result wins.
- A shard that cannot be read (older Optuna schema, half-synced, not SQLite) is skipped with a
  warning naming it, and read again when it changes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import InMemoryStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.pool import NullPool

from sweeper.errors import SweeperError, UserError, env_number, first_line
from sweeper.record import FINISHED, ORIGIN, PER_WORKER, RESULT, RESUMES
from sweeper.storage.registry import Backend, register

# ORIGIN, on every trial in the view: "<shard id>#<trial number in that shard>", where its record lives
CLAIM = "drive:claim"  # on a trial run for an enqueued point: the point's origin
LOST = "drive:claim_lost"  # on a claim that lost to another worker's claim on the same point
OVERRIDE = "drive:override:"  # + origin: a study system attr in the shard of a worker that took that trial over
RESUME_KEY = "resume:"  # + origin: what every resume of a taken-over trial claims, so that one runs

log = logging.getLogger(__name__)


def _seconds(name: str, default: float) -> float:
    return env_number(name, default)


def folder_of(url: str) -> Path:
    """drive:///abs/folder is absolute (like file://), drive://rel/folder relative."""
    path = url[len("drive://"):].rstrip("/")
    if not path:
        raise UserError(f"drive store needs a folder: drive:///content/drive/MyDrive/sweeps/NAME (got {url!r})")
    return Path(path)


def shard_name(worker_id: str) -> str:
    """A worker id as a file name: `alice/1a2b3c4d` -> `alice-1a2b3c4d`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", worker_id).strip(".-") or uuid.uuid4().hex[:8]


def _shard_of(origin: str) -> str:
    return origin.rpartition("#")[0]


def _with_origin(trial: FrozenTrial, origin: str) -> FrozenTrial:
    """A copy of the record that says where it lives (ORIGIN), for the view."""
    trial = copy.copy(trial)
    trial.system_attrs = {**trial.system_attrs, ORIGIN: origin}
    return trial


def _point_key(trial: FrozenTrial, origin: str | None = None) -> str:
    """What claims on an enqueued point name: a resume, the trial it continues (of several workers' resumes of
    one stale trial, one runs); any other point, its own origin."""
    resumes = trial.user_attrs.get(RESUMES)
    return f"{RESUME_KEY}{resumes}" if resumes is not None else (origin or trial.system_attrs[ORIGIN])


class DriveStorage(InMemoryStorage):
    """The merged view of a drive folder's shards; writes go to this process's own shard."""

    def __init__(self, folder: Path, sync_s: float | None = None, settle_s: float | None = None):
        super().__init__()
        if not folder.parent.is_dir():
            raise UserError(f"folder {folder.parent} does not exist (is Drive mounted?)")
        if folder.exists() and not folder.is_dir():
            raise UserError(f"drive store {folder} is a file, not a folder")
        self.folder = folder
        self.sync_s = _seconds("SWEEPER_DRIVE_SYNC_S", 5) if sync_s is None else sync_s
        self.settle_s = _seconds("SWEEPER_DRIVE_SETTLE_S", 30) if settle_s is None else settle_s
        self.lag_s = _seconds("SWEEPER_DRIVE_LAG_S", 300)  # how late Drive may show a write: added to leases' grace
        self.shard_id: str | None = None  # may be set before the first write; else made up then
        self._shard: RDBStorage | None = None
        self._shard_path: Path | None = None
        self._shard_study: dict[int, int] = {}  # view study id -> shard study id
        self._created_studies: set[int] = set()  # view study ids this process created
        self._own: dict[int, int] = {}  # view trial id -> shard trial id
        # (view study id, foreign origin) -> view trial id (None: slot given away). An origin is unique within a
        # study only: a shard numbers each of its studies' trials from 0.
        self._origin: dict[tuple[int, str], int | None] = {}
        self._seen: dict[str, tuple[int, int, int]] = {}  # shard file -> (mtime_ns, size, inode) last read
        self._overrides: dict[tuple[int, str], dict[str, Any]] = {}  # (study, origin) -> another's takeover of it
        self._my_overrides: dict[tuple[int, str], dict[str, Any]] = {}  # (study, origin) -> our takeover of it
        self._synced_at = -float("inf")
        self._read_dir = tempfile.TemporaryDirectory(prefix="sweeper-shards-")
        self._readers: dict[str, RDBStorage] = {}  # shard file -> reader of our copy of it
        self.sync()

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickled, handed to another process) is one more view of the folder, with a shard of its own made at
        # its first write: no shard is ever written by two storages (each skips its own shard when it reads the
        # folder, and ours lives in our temp folder, deleted with us).
        return {"folder": self.folder, "sync_s": self.sync_s, "settle_s": self.settle_s, "lag_s": self.lag_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["sync_s"], state["settle_s"])
        self.lag_s = state["lag_s"]

    # -- reading the other shards ---------------------------------------------------------------

    def sync(self, force: bool = True) -> None:
        """Bring in what changed in the other shards (if force or sync_s has passed)."""
        if not force and time.monotonic() - self._synced_at < self.sync_s:
            return
        with self._lock:
            self._synced_at = time.monotonic()
            try:
                paths = sorted(p for p in self.folder.glob("*.db") if p.stem != self.shard_id)
            except OSError as e:
                raise SweeperError(f"cannot list drive folder {self.folder}: {e.strerror or e}") from None
            for path in paths:
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)  # a publish is a rename: a new inode
                if self._seen.get(path.name) == key:
                    continue
                self._seen[path.name] = key
                for study, trials in self._read_shard(path):
                    view_study = self._view_study(study)
                    for trial in trials:
                        self._merge(view_study, f"{path.stem}#{trial.number}", trial)
                    self._overrides.update({(view_study, k[len(OVERRIDE):]): v for k, v in study.system_attrs.items()
                                            if k.startswith(OVERRIDE)})
            self._apply_overrides()

    def _read_shard(self, path: Path) -> list[tuple[Any, list[FrozenTrial]]]:
        """Every study and trial in one shard, read from a private copy (Drive may replace the file meanwhile);
        [] with a warning if it cannot be read. A shard's reader is kept: opening one costs 10x a read."""
        copy_path = Path(self._read_dir.name) / path.name
        try:
            shutil.copyfile(path, copy_path.with_suffix(".new"))
            os.replace(copy_path.with_suffix(".new"), copy_path)
            if path.name not in self._readers:
                with contextlib.closing(sqlite3.connect(f"file:{copy_path}?mode=ro", uri=True)) as db:
                    db.execute("SELECT 1 FROM studies LIMIT 1")  # junk or an empty file: fail here, create nothing
                # NullPool: every read opens the file afresh, so it sees the copy just renamed into place.
                self._readers[path.name] = RDBStorage(f"sqlite:///{copy_path}", skip_table_creation=True,
                                                      engine_kwargs={"poolclass": NullPool})
            reader = self._readers[path.name]
            return [(s, reader.get_all_trials(s._study_id, deepcopy=False)) for s in reader.get_all_studies()]
        except FileNotFoundError:
            return []  # replaced or removed since listed: read it next time
        except Exception as e:  # sqlite, sqlalchemy and Optuna's schema check all fail differently
            log.warning("skipping shard %s: %s", path, first_line(e))
            self._readers.pop(path.name, None)
            return []

    def _view_study(self, study: Any) -> int:
        try:
            study_id = super().get_study_id_from_name(study.study_name)
        except KeyError:
            study_id = super().create_new_study(study.directions, study.study_name)
        known = super().get_study_user_attrs(study_id)
        for key, value in study.user_attrs.items():
            if key not in known:  # a spec never changes on a drive store (set_study_user_attr)
                super().set_study_user_attr(study_id, key, value)
        known = super().get_study_system_attrs(study_id)  # (samplers keep state there); the first value seen stays
        for key, value in study.system_attrs.items():
            if key not in known and not key.startswith(OVERRIDE):  # overrides are applied to trials, not shown
                super().set_study_system_attr(study_id, key, value)
        return study_id

    def _merge(self, study_id: int, origin: str, trial: FrozenTrial) -> None:
        """One foreign trial record into the view: new, changed, or a claim taking its point's slot."""
        key = (study_id, origin)
        if key in self._origin:
            slot = self._origin[key]
            if slot is None:  # its slot went to a claim; the record matters again once it runs itself
                if trial.state == TrialState.WAITING:
                    return
                self._origin[key] = self._add(study_id, origin, trial)
            elif slot not in self._own:
                seen = super().get_trial(slot).state
                # A finished record never changes; but a takeover's FAIL gives way to the owner's own result.
                if not seen.is_finished() or (seen == TrialState.FAIL and trial.state in FINISHED):
                    self._put(slot, origin, trial)
            return
        point = trial.system_attrs.get(CLAIM)
        slot = self._point_slot(study_id, point) if point else None
        if slot is not None:
            self._origin[study_id, super().get_trial(slot).system_attrs[ORIGIN]] = None  # the first claim seen takes
            self._origin[key] = slot  # the point's place in the view
            self._own.pop(slot, None)  # our own point: it stays WAITING in our shard, like any point
            self._put(slot, origin, trial)
        elif trial.state == TrialState.WAITING and point is None and self._claimants(study_id, _point_key(trial, origin)):
            self._origin[key] = None  # a point whose claim we already see
        else:
            self._origin[key] = self._add(study_id, origin, trial)

    def _point_slot(self, study_id: int, key: str) -> int | None:
        """The view's slot of an unclaimed point that claims named `key` take."""
        return next((t._trial_id for t in super().get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
                     if CLAIM not in t.system_attrs and _point_key(t) == key), None)

    def _slot_of(self, study_id: int, origin: str) -> int | None:
        """The view's slot of the trial `origin` names in this study."""
        if _shard_of(origin) != self.shard_id:
            return self._origin.get((study_id, origin))
        for slot in self._own:  # (a loop: super() does not work inside a generator expression)
            if (self._trial_id_to_study_id_and_number[slot][0] == study_id
                    and super().get_trial(slot).system_attrs.get(ORIGIN) == origin):
                return slot
        return None

    def _add(self, study_id: int, origin: str, trial: FrozenTrial) -> int:
        return super().create_new_trial(study_id, template_trial=_with_origin(trial, origin))

    def _put(self, slot: int, origin: str, trial: FrozenTrial) -> None:
        """Replace the view's record in `slot` with a foreign one, keeping the slot's id and number."""
        trial = _with_origin(trial, origin)
        trial._trial_id, trial.number = slot, super().get_trial(slot).number
        study_id = self._trial_id_to_study_id_and_number[slot][0]
        self._set_trial(slot, trial)
        self._update_cache(slot, study_id)

    # -- claims -----------------------------------------------------------------------------------

    def _claimants(self, study_id: int, point: str) -> list[FrozenTrial]:
        return [t for t in super().get_all_trials(study_id, deepcopy=False)
                if t.system_attrs.get(CLAIM) == point and not t.system_attrs.get(LOST)]

    def claim_winner(self, trial_id: int) -> FrozenTrial | None:
        """The winning claim on this trial's enqueued point (None if it claims none): every worker picks
        the same one from the same records, a finished claim first, then the lowest shard id."""
        trial = self.get_trial(trial_id)
        point = trial.system_attrs.get(CLAIM)
        if point is None:
            return None
        study_id = self._trial_id_to_study_id_and_number[trial_id][0]
        if point.startswith(RESUME_KEY):  # the trial a resume continues finished after all: it wins
            original = self._slot_of(study_id, point[len(RESUME_KEY):])
            if original is not None and super().get_trial(original).state in FINISHED:
                return super().get_trial(original)
        claimants = self._claimants(study_id, point) or [trial]
        return min(claimants, key=lambda t: (not t.state.is_finished(), _shard_of(t.system_attrs[ORIGIN])))

    def _lost_to(self, trial_id: int) -> str | None:
        winner = self.claim_winner(trial_id)
        if winner is None or winner._trial_id == trial_id:
            return None
        point = self.get_trial(trial_id).system_attrs[CLAIM]
        return f"enqueued point {point} is also taken by worker {_shard_of(winner.system_attrs[ORIGIN])}, which wins"

    def drop_lost_claim(self, trial_id: int) -> str | None:
        """Re-read the folder (if sync_s passed); if another worker's claim on this trial's point wins, mark ours LOST and
        return why (the caller stops the trial and fails it). None: carry on."""
        self.sync(force=False)
        reason = self._lost_to(trial_id)
        if reason is not None:
            self.set_trial_system_attr(trial_id, LOST, True)
        return reason

    def _claimable(self, trial_id: int) -> str | None:
        """The key claims on this waiting trial name, or None if it is a claim itself or someone claimed it."""
        trial = super().get_trial(trial_id)
        point = _point_key(trial)
        study_id = self._trial_id_to_study_id_and_number[trial_id][0]
        return None if CLAIM in trial.system_attrs or self._claimants(study_id, point) else point

    def _claim(self, trial_id: int) -> bool:
        """Optuna's ask popping another worker's point: run it as our claim, if no other claim beats ours after
        settle_s. The claim is RUNNING from the start, so a worker dying while it settles is taken over."""
        point = self._claimable(trial_id)
        if point is None:
            return False
        point_trial = super().get_trial(trial_id)
        study_id = self._trial_id_to_study_id_and_number[trial_id][0]
        self._origin[study_id, point_trial.system_attrs[ORIGIN]] = None
        claim = copy.copy(point_trial)
        claim.state, claim.datetime_start = TrialState.RUNNING, datetime.now()
        claim.system_attrs = {k: v for k, v in point_trial.system_attrs.items() if k != ORIGIN} | {CLAIM: point}
        self._own[trial_id] = self._shard_storage().create_new_trial(self._shard_study_id(study_id), template_trial=claim)
        self._set_trial(trial_id, claim)
        self._tag_own(trial_id)
        self._publish()
        time.sleep(self.settle_s)
        self.sync()
        if (reason := self.drop_lost_claim(trial_id)) is not None:
            self.set_trial_user_attr(trial_id, RESULT, {"fail_reason": f"claim lost: {reason}"})
            self.set_trial_state_values(trial_id, TrialState.FAIL)
            return False
        return True

    def _tag_own(self, trial_id: int) -> None:
        """Our trial's ORIGIN, in the view only (other workers derive it from our shard's name)."""
        self._set_trial(trial_id, _with_origin(super().get_trial(trial_id), self._own_origin(trial_id)))

    def _own_origin(self, trial_id: int) -> str:
        return f"{self.shard_id}#{self._shard_storage().get_trial_number_from_id(self._own[trial_id])}"

    # -- writing our own shard --------------------------------------------------------------------

    def _shard_storage(self) -> RDBStorage:
        if self._shard is None:
            self.shard_id = self.shard_id or shard_name(f"{os.uname().nodename[:20]}-{uuid.uuid4().hex[:8]}")
            self._shard_path = Path(self._read_dir.name) / "own" / f"{self.shard_id}.db"
            self._shard_path.parent.mkdir()
            self._shard = RDBStorage(f"sqlite:///{self._shard_path}")
        return self._shard

    def _shard_study_id(self, study_id: int) -> int:
        if study_id not in self._shard_study:
            shard = self._shard_storage()
            shard_study = shard.create_new_study(super().get_study_directions(study_id), super().get_study_name_from_id(study_id))
            for key, value in super().get_study_user_attrs(study_id).items():
                shard.set_study_user_attr(shard_study, key, value)
            for key, value in super().get_study_system_attrs(study_id).items():
                shard.set_study_system_attr(shard_study, key, value)
            self._shard_study[study_id] = shard_study
        return self._shard_study[study_id]

    def _publish(self) -> None:
        """Our shard into the folder: a hidden temp file, fsync, atomic rename (readers see old or new)."""
        assert self._shard_path is not None
        target = self.folder / self._shard_path.name
        temp = self.folder / f".{self._shard_path.name}.{uuid.uuid4().hex[:6]}.tmp"
        snapshot = self._shard_path.with_suffix(".snapshot")  # SQLite works on local disk only, never on the mount
        try:
            self.folder.mkdir(exist_ok=True)
            source, copy_to = sqlite3.connect(self._shard_path), sqlite3.connect(snapshot)
            try:
                source.backup(copy_to)
            finally:
                source.close()
                copy_to.close()
            shutil.copyfile(snapshot, temp)
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(temp, target)
        except (OSError, sqlite3.Error) as e:
            temp.unlink(missing_ok=True)
            raise SweeperError(f"cannot write shard {target}: {getattr(e, 'strerror', None) or e}") from None

    def _mirror(self, trial_id: int, method: str, *args: Any) -> None:
        """Apply a write made in the view to our shard's copy of the trial and publish it."""
        if trial_id not in self._own:
            return self._override(trial_id, method, *args)
        getattr(self._shard_storage(), method)(self._own[trial_id], *args)
        self._publish()

    def _override(self, trial_id: int, method: str, *args: Any) -> None:
        """A write to another worker's trial: a takeover failing its stale trial, with the reason. Recorded in our
        shard as a study system attr that every view applies; the trial's worker, if alive, fails it in its own
        shard when it sees it. Should that worker finish the trial anyway, its result wins (_merge)."""
        origin = super().get_trial(trial_id).system_attrs.get(ORIGIN, "?")
        study_id = self._trial_id_to_study_id_and_number[trial_id][0]
        record = self._my_overrides.setdefault((study_id, origin), {"user_attrs": {}, "fail": False})
        if method == "set_trial_user_attr":
            record["user_attrs"][args[0]] = args[1]
        elif method == "set_trial_state_values" and args[0] == TrialState.FAIL:
            record["fail"] = True
        else:
            raise SweeperError(f"trial {origin} belongs to another worker's shard; only its worker writes it")
        self._shard_storage().set_study_system_attr(self._shard_study_id(study_id), OVERRIDE + origin, record)
        self._publish()

    def _apply_overrides(self) -> None:
        for (study_id, origin), record in self._overrides.items():
            slot = self._slot_of(study_id, origin)
            if slot is None or super().get_trial(slot).state != TrialState.RUNNING:
                continue
            if slot in self._own:  # our trial was taken over (we stalled past the grace): fail it in our shard
                for key, value in record["user_attrs"].items():
                    self.set_trial_user_attr(slot, key, value)
                if record["fail"]:
                    self.set_trial_state_values(slot, TrialState.FAIL)
            else:
                for key, value in record["user_attrs"].items():
                    super().set_trial_user_attr(slot, key, value)
                if record["fail"]:
                    super().set_trial_state_values(slot, TrialState.FAIL)

    # -- the BaseStorage writes -------------------------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        with self._lock:
            self.sync()
            study_id = super().create_new_study(directions, study_name)
            self._created_studies.add(study_id)
            self._shard_study_id(study_id)
            self._publish()
            return study_id

    def delete_study(self, study_id: int) -> None:
        with self._lock:
            self._check_study_id(study_id)  # no such study: KeyError, as every Optuna storage
        raise UserError("a drive:// study cannot be deleted: its records live in every worker's shard; "
                        "use a new study name or folder")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        """The study's creator sets its attrs (the spec); any worker its own per-worker ones (its machine card, its
        stop: record.PER_WORKER, keyed by its id), which no other shard writes and every view merges."""
        with self._lock:
            self._check_study_id(study_id)  # no such study: KeyError, as every Optuna storage
            if study_id not in self._created_studies and not key.startswith(PER_WORKER):
                raise UserError("a drive:// study's spec cannot change once workers copied it; use a new study name")
            super().set_study_user_attr(study_id, key, value)
            self._shard_storage().set_study_user_attr(self._shard_study_id(study_id), key, value)
            self._publish()

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        with self._lock:
            super().set_study_system_attr(study_id, key, value)
            self._shard_storage().set_study_system_attr(self._shard_study_id(study_id), key, value)
            self._publish()

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        with self._lock:
            trial_id = super().create_new_trial(study_id, template_trial)
            template = copy.copy(super().get_trial(trial_id))
            template.system_attrs = {k: v for k, v in template.system_attrs.items() if k != ORIGIN}
            self._own[trial_id] = self._shard_storage().create_new_trial(self._shard_study_id(study_id),
                                                                         template_trial=template)
            self._tag_own(trial_id)
            self._publish()
            return trial_id

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        with self._lock:
            super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
            self._mirror(trial_id, "set_trial_param", param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        with self._lock:
            if state == TrialState.RUNNING and super().get_trial(trial_id).state == TrialState.WAITING:
                if trial_id not in self._own:
                    return self._claim(trial_id)
                if (point := self._claimable(trial_id)) is None:
                    return False
                self.set_trial_system_attr(trial_id, CLAIM, point)  # our own point: popping it is the claim
            if not super().set_trial_state_values(trial_id, state, values):
                return False
            self._mirror(trial_id, "set_trial_state_values", state, values)
            return True

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        with self._lock:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
            self._mirror(trial_id, "set_trial_intermediate_value", step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            super().set_trial_user_attr(trial_id, key, value)
            self._mirror(trial_id, "set_trial_user_attr", key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            super().set_trial_system_attr(trial_id, key, value)
            self._mirror(trial_id, "set_trial_system_attr", key, value)

    # -- the reads every ask makes: keep the view fresh -------------------------------------------

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        self.sync(force=False)
        trials = super().get_all_trials(study_id, deepcopy, states)
        if states == (TrialState.WAITING,):  # ask pops the first: each worker tries the points in its own order
            trials.sort(key=lambda t: zlib.crc32(f"{self.shard_id}:{t.system_attrs.get(ORIGIN)}".encode()))
        return trials


def duplicate_claims(trials: list[FrozenTrial]) -> dict[int, int]:
    """Trial number -> the number of the claim it duplicates, for points that two finished claims ran."""
    winners: dict[str, FrozenTrial] = {}
    duplicates = {}
    finished = [t for t in trials if t.system_attrs.get(CLAIM) and t.state.is_finished() and not t.system_attrs.get(LOST)]
    for t in sorted(finished, key=lambda t: _shard_of(t.system_attrs.get(ORIGIN, ""))):
        point = t.system_attrs[CLAIM]
        if point in winners:
            duplicates[t.number] = winners[point].number
        else:
            winners[point] = t
    return duplicates


def open_drive(url: str) -> DriveStorage:
    return DriveStorage(folder_of(url))


def join(storage: DriveStorage, worker_id: str) -> None:
    storage.shard_id = shard_name(worker_id)  # a worker's shard is named after it


def lease_timing(storage: DriveStorage, heartbeat_s: float) -> tuple[float, float]:
    return heartbeat_s, storage.lag_s  # a write shows in other workers' views up to lag_s late


def trial_notes(trials: list[FrozenTrial]) -> dict[int, str]:
    return {number: f"duplicate of #{first}" for number, first in duplicate_claims(trials).items()}


register(Backend("drive", "drive:///content/drive/MyDrive/sweeps/NAME", "Colab workers sharing a Drive folder",
                 open_drive, lease_timing=lease_timing, join=join, claim_lost=DriveStorage.drop_lost_claim,
                 trial_notes=trial_notes))
