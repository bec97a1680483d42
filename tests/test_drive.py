"""The drive:// store: one shard per worker in a synced folder, merged on read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from synced_folder import SyncedFolders
from test_cli import sweeper

from sweeper.errors import UserError
from sweeper.storage import open_storage
from sweeper.storage.drive import CLAIM, LOST, ORIGIN, DriveStorage

TESTS = Path(__file__).parent


def drive(folder: Path, shard: str, settle_s: float = 0.0) -> DriveStorage:
    storage = DriveStorage(folder, sync_s=0, settle_s=settle_s)
    storage.shard_id = shard
    return storage


def finished(storage: DriveStorage, study: str = "s") -> list[optuna.trial.FrozenTrial]:
    storage.sync()
    return [t for t in optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
            if t.state.is_finished()]


def test_workers_see_each_other_and_a_reader_writes_nothing(tmp_path):
    folder = tmp_path / "sweep"
    a = optuna.create_study(study_name="s", storage=drive(folder, "a"))
    b = optuna.load_study(study_name="s", storage=drive(folder, "b"))
    for study, lr in ((a, 1e-3), (b, 1e-2), (a, 1e-4)):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1, log=True)})
        trial.report(lr * 2, 1)
        study.tell(trial, lr)
    assert sorted(p.name for p in folder.iterdir()) == ["a.db", "b.db"]  # temp files renamed away
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    reader = open_storage(f"drive://{folder}")
    trials = optuna.load_study(study_name="s", storage=reader).get_trials()
    assert sorted((t.system_attrs[ORIGIN], t.value) for t in trials) == [("a#0", 1e-3), ("a#1", 1e-4), ("b#0", 1e-2)]
    assert [t.intermediate_values for t in trials] == [{1: 2e-3}, {1: 2e-4}, {1: 2e-2}]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # report and best only read
    # Every view counts each trial once, however often it is read.
    assert len(finished(a._storage)) == len(finished(b._storage)) == len(finished(a._storage)) == 3


def test_a_shard_holds_only_its_own_trials(tmp_path):
    folder = tmp_path / "sweep"
    a = optuna.create_study(study_name="s", storage=drive(folder, "a"))
    a.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    b = optuna.load_study(study_name="s", storage=drive(folder, "b"))
    b.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    shard = RDBStorage(f"sqlite:///{folder / 'b.db'}")
    study_id = shard.get_study_id_from_name("s")
    assert len(shard.get_all_trials(study_id)) == 1  # no copies of a's trials: Drive carries each result once
    assert len(b.trials) == 3


def test_an_enqueued_point_runs_once_and_its_claim_takes_its_place(tmp_path):
    folder = tmp_path / "sweep"
    laptop = optuna.create_study(study_name="s", storage=drive(folder, "laptop"))
    laptop.enqueue_trial({"x": 0.5})
    w1 = optuna.load_study(study_name="s", storage=drive(folder, "w1"))
    trial = w1.ask()
    assert trial.suggest_float("x", 0, 1) == 0.5
    w1.tell(trial, 1.0)
    w2 = optuna.load_study(study_name="s", storage=drive(folder, "w2"))
    assert [(t.state, t.params, t.system_attrs[ORIGIN], t.system_attrs[CLAIM]) for t in w2.trials] == [
        (TrialState.COMPLETE, {"x": 0.5}, "w1#0", "laptop#0")]  # the point shows once: as the run that took it
    assert w2.ask().suggest_float("x", 0, 1) != 0.5  # nothing left to claim: the sampler's turn


def point_in_two_copies(tmp_path: Path) -> tuple[Path, Path]:
    """A laptop enqueues one point; two copies of the folder hold it, which then drift apart (Drive's lag)."""
    shared, late = tmp_path / "shared", tmp_path / "late"
    laptop = optuna.create_study(study_name="s", storage=drive(shared, "laptop"))
    laptop.enqueue_trial({"x": 0.5})
    shutil.copytree(shared, late)
    return shared, late


def test_racing_claims_pick_one_winner_and_the_loser_stops(tmp_path):
    """Two workers claim one point before either sees the other (lag): both learn the same winner."""
    shared, late = point_in_two_copies(tmp_path)
    w_b = optuna.load_study(study_name="s", storage=drive(shared, "b"))
    w_a = optuna.load_study(study_name="s", storage=drive(late, "a"))  # does not see b's shard yet
    tb, ta = w_b.ask(), w_a.ask()
    assert tb.suggest_float("x", 0, 1) == ta.suggest_float("x", 0, 1) == 0.5
    shutil.copy(shared / "b.db", late / "b.db")  # Drive delivers each shard to the other
    shutil.copy(late / "a.db", shared / "a.db")
    assert w_a._storage.drop_lost_claim(ta._trial_id) is None  # a < b: a wins on both sides
    reason = w_b._storage.drop_lost_claim(tb._trial_id)
    assert reason == "enqueued point laptop#0 is also taken by worker a, which wins"
    w_b.tell(tb, state=TrialState.FAIL)
    w_a.tell(ta, 2.0)
    shutil.copy(shared / "b.db", late / "b.db")
    shutil.copy(late / "a.db", shared / "a.db")
    for study in (w_a, w_b):
        rows = [(t.state, t.system_attrs.get(LOST, False)) for t in finished(study._storage)]
        assert sorted(rows, key=str) == sorted([(TrialState.COMPLETE, False), (TrialState.FAIL, True)], key=str)


def test_a_finished_claim_wins_over_a_lower_id(tmp_path):
    shared, late = point_in_two_copies(tmp_path)
    w_z = optuna.load_study(study_name="s", storage=drive(shared, "z"))
    tz = w_z.ask()
    w_z.tell(tz, 1.0)  # z ran the point to the end before a's claim reached it
    w_a = optuna.load_study(study_name="s", storage=drive(late, "a"))
    ta = w_a.ask()
    shutil.copy(shared / "z.db", late / "z.db")
    assert "taken by worker z" in w_a._storage.drop_lost_claim(ta._trial_id)


def test_claims_that_both_finished_are_marked_in_the_report(tmp_path, spec_toml):
    shared, late = tmp_path / "shared", tmp_path / "late"
    url = f"drive://{shared}"
    assert sweeper("init", spec_toml, "--store", url).exit_code == 0
    assert sweeper("enqueue", "--store", url, "--point", "learning_rate=1e-4,batch_size=8").exit_code == 0
    shutil.copytree(shared, late)
    for folder, name, loss in ((shared, "b", 1.0), (late, "a", 2.0)):  # neither sees the other until both finished
        study = optuna.load_study(study_name="demo", storage=drive(folder, name))
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 1e-3, log=True)
        study.tell(trial, loss)
    shutil.copy(late / "a.db", shared / "a.db")
    result = sweeper("report", "--store", url, "--json")
    rows = json.loads(result.output)
    assert [(r["state"], r["eval_loss"], r["note"]) for r in rows] == [
        ("COMPLETE", 2.0, ""), ("COMPLETE", 1.0, "duplicate of #0")]
    table = sweeper("report", "--store", url).output
    assert "duplicate of #0" in table


def test_unreadable_shards_are_skipped_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "sweep"
    a = optuna.create_study(study_name="s", storage=drive(folder, "a"))
    a.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    (folder / "half.db").write_bytes((folder / "a.db").read_bytes()[:3000])  # a half-synced shard
    (folder / "junk.db").write_text("not a database")
    (folder / "empty.db").write_bytes(b"")
    old = folder / "old.db"
    shutil.copy(folder / "a.db", old)
    with __import__("sqlite3").connect(old) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")  # a shard from an older Optuna
    reader = DriveStorage(folder)
    assert len(optuna.load_study(study_name="s", storage=reader).trials) == 2
    warned = {r.getMessage().split(":")[0] for r in caplog.records}
    assert warned == {f"skipping shard {folder / n}" for n in ("half.db", "junk.db", "empty.db", "old.db")}


def test_drive_urls_and_what_a_drive_study_refuses(tmp_path, spec_toml):
    result = sweeper("report", "--store", "drive:///no/such/place/sweep")
    assert result.exit_code == 2 and "folder /no/such/place does not exist (is Drive mounted?)" in result.output
    assert sweeper("report", "--store", "drive://").exit_code == 2
    url = f"drive://{tmp_path / 'sweep'}"
    assert sweeper("init", spec_toml, "--store", url).exit_code == 0
    assert sweeper("init", spec_toml, "--store", url).exit_code == 0  # unchanged: fine
    changed = tmp_path / "changed.toml"
    changed.write_text(spec_toml.read_text().replace("n_trials = 6", "n_trials = 7"))
    result = sweeper("init", changed, "--store", url, "--overwrite")
    assert result.exit_code == 2 and "cannot change once workers copied it" in result.output
    with pytest.raises(UserError, match="cannot be deleted"):
        optuna.delete_study(study_name="demo", storage=open_storage(url))


def test_any_worker_writes_its_own_machine_card_and_stop_and_every_view_sees_them(tmp_path):
    from sweeper.leases import record_worker_stop, stopped_workers
    from sweeper.record import CARD, cards

    folder = tmp_path / "sweep"
    a = optuna.create_study(study_name="s", storage=drive(folder, "a"))
    a.set_user_attr("sweeper_spec", {"n_trials": 3})
    b = optuna.load_study(study_name="s", storage=drive(folder, "b"))  # not the study's creator
    b.set_user_attr(CARD + "bo/1", {"gpu": "Tesla T4", "ok": True})
    record_worker_stop(b, {"id": "bo/1", "account": "bo", "platform": "colab", "gpu": "Tesla T4"}, "preflight failed")
    with pytest.raises(UserError, match="cannot change once workers copied it"):
        b.set_user_attr("sweeper_spec", {"n_trials": 4})  # the spec stays the creator's
    for view in (a, optuna.load_study(study_name="s", storage=open_storage(f"drive://{folder}"))):
        view._storage.sync()
        assert cards(view.user_attrs) == {"bo/1": {"gpu": "Tesla T4", "ok": True}}
        assert [line.endswith("stopped: preflight failed") for line in stopped_workers(view)] == [True]
        assert view.user_attrs["sweeper_spec"] == {"n_trials": 3}


def test_six_workers_on_a_lagging_synced_folder_lose_nothing(tmp_path, spec_table):
    """6 worker processes x 5 trials, each seeing its own copy of the folder, files carried between copies
    0-0.6 s late and out of order (Drive's minutes, scaled down), claims settling for 0.3 s."""
    import tomli_w

    workers = [f"w{i}" for i in range(6)]
    folders = SyncedFolders(tmp_path / "machines", ["laptop", *workers], max_delay_s=0.6, seed=5)
    spec_table["n_trials"] = 100
    spec_file = tmp_path / "sweep.toml"
    spec_file.write_text(tomli_w.dumps(spec_table))
    laptop = f"drive://{folders.copies['laptop']}"
    assert sweeper("init", spec_file, "--store", laptop).exit_code == 0
    points = [f"learning_rate={lr},batch_size={bs}" for lr in (1e-4, 3e-4, 1e-3) for bs in (8, 16)]
    assert sweeper("enqueue", "--store", laptop, *(a for p in points for a in ("--point", p))).exit_code == 0
    folders.settle()
    env = {**os.environ, "SWEEPER_DRIVE_SETTLE_S": "0.3", "SWEEPER_DRIVE_SYNC_S": "0.1", "FAST_TRAINER_STEP_S": "0.05"}
    procs = [subprocess.Popen([sys.executable, str(TESTS / "fast_trainer.py"), "--store", f"drive://{folders.copies[w]}",
                               "--study", "demo", "--max-trials", "5", "--account", w,
                               "--checkpoint-root", str(tmp_path / "checkpoints" / w)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in workers]
    started = time.monotonic()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    print(f"workers ran {time.monotonic() - started:.1f} s")
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    folders.settle()
    folders.stop()

    truth = {}  # what each shard says about its own trials, read straight from the files
    for shard in folders.copies["laptop"].glob("*.db"):
        storage = RDBStorage(f"sqlite:///{shard}")
        for t in storage.get_all_trials(storage.get_study_id_from_name("demo")):
            truth[f"{shard.stem}#{t.number}"] = t
        storage.engine.dispose()
    done = {origin for origin, t in truth.items() if t.state.is_finished()}
    assert all(len(json.loads(out.splitlines()[-1])["trials"]) == 5 for out in outputs)  # each ran its 5 trials
    enqueued = {o for o, t in truth.items() if t.state == TrialState.WAITING and CLAIM not in t.system_attrs}
    assert len(enqueued) == len(points)

    for machine, folder in folders.copies.items():
        view = finished(DriveStorage(folder), "demo")
        origins = Counter(t.system_attrs[ORIGIN] for t in view)
        assert set(origins) == done and set(origins.values()) == {1}, machine  # each finished trial exactly once

    rows = json.loads(sweeper("report", "--store", laptop, "--json").output)
    runs_per_point = Counter(t.system_attrs[CLAIM] for t in truth.values()
                             if CLAIM in t.system_attrs and t.state.is_finished() and not t.system_attrs.get(LOST))
    assert set(runs_per_point) == enqueued  # every enqueued point ran
    duplicates = sum(n - 1 for n in runs_per_point.values())
    assert sum(r["note"].startswith("duplicate of") for r in rows) == duplicates  # each extra run is marked
    lost = sum(bool(t.system_attrs.get(LOST)) for t in truth.values())
    print(f"carried {folders.carried} files; {lost} claims lost, {duplicates} duplicate runs")


def test_a_takeover_is_seen_by_all_and_a_slow_owner_that_finishes_anyway_wins(tmp_path):
    from sweeper.leases import RESUMES, hand_over

    shared, late = tmp_path / "shared", tmp_path / "late"
    owner = optuna.create_study(study_name="s", storage=drive(shared, "a"))
    trial = owner.ask()
    trial.suggest_float("x", 0, 1)
    shutil.copytree(shared, late)
    taker = optuna.load_study(study_name="s", storage=drive(late, "b"))  # sees a's trial running, then silence
    stale = taker._storage.get_all_trials(0, deepcopy=False)[0]
    assert hand_over(taker, stale, {"stale_reason": "stale: test"}, "/ckpt/a-0")
    reader = DriveStorage(late)  # a third worker: the override in b's shard fails a's trial in its view too
    assert [t.state for t in reader.get_all_trials(0, deepcopy=False)] == [TrialState.FAIL, TrialState.WAITING]
    resume = taker.ask()  # b runs the resume
    assert resume.user_attrs[RESUMES] == "a#0"

    owner.tell(trial, 0.5)  # a was only slow: it finishes before it sees the takeover
    shutil.copy(shared / "a.db", late / "a.db")
    assert "taken by worker a" in taker._storage.drop_lost_claim(resume._trial_id)  # the owner's result wins
    taker.tell(resume, state=TrialState.FAIL)
    view = {t.system_attrs[ORIGIN]: t for t in DriveStorage(late).get_all_trials(0, deepcopy=False)}
    assert view["a#0"].state == TrialState.COMPLETE and view["a#0"].value == 0.5


def test_an_owner_that_sees_the_takeover_fails_its_trial_in_its_own_shard(tmp_path):
    from sweeper.leases import hand_over

    folder = tmp_path / "sweep"
    owner = optuna.create_study(study_name="s", storage=drive(folder, "a"))
    trial = owner.ask()
    taker = optuna.load_study(study_name="s", storage=drive(folder, "b"))
    hand_over(taker, taker._storage.get_all_trials(0, deepcopy=False)[0], {"stale_reason": "stale: test"}, None)
    owner._storage.sync()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # its next write: "taken over", go on
        trial.report(1.0, 1)
    shard = RDBStorage(f"sqlite:///{folder / 'a.db'}")
    assert shard.get_all_trials(shard.get_study_id_from_name("s"))[0].state == TrialState.FAIL


def test_a_shard_holding_two_studies_shows_each_its_own_trials(tmp_path):
    """Trial numbers are per study in a shard: s1's a#0 and s2's a#0 are two trials, in every view, for claims
    and for takeovers."""
    from sweeper.leases import hand_over

    folder = tmp_path / "sweep"
    a = drive(folder, "a")
    a1, a2 = (optuna.create_study(study_name=name, storage=a) for name in ("s1", "s2"))
    running = a1.ask()
    running.suggest_float("x", 0, 1)
    done = a2.ask()
    done.suggest_float("y", 0, 1)
    a2.tell(done, 0.5)
    b = drive(folder, "b")
    b1, b2 = (optuna.load_study(study_name=name, storage=b) for name in ("s1", "s2"))
    view = [[(t.state, t.params, t.system_attrs[ORIGIN]) for t in s.get_trials(deepcopy=False)] for s in (b1, b2)]
    assert view == [[(TrialState.RUNNING, running.params, "a#0")], [(TrialState.COMPLETE, done.params, "a#0")]]

    a1.ask(), a2.ask()  # a#1 running in each study
    a1.enqueue_trial({"x": 0.25}), a2.enqueue_trial({"y": 0.75})  # a#2 waiting in each
    assert b2.ask().suggest_float("y", 0, 1) == 0.75  # b's claims: b#0 in s2, then b#0 in s1
    assert b1.ask().suggest_float("x", 0, 1) == 0.25
    assert hand_over(b1, next(t for t in b1.get_trials(deepcopy=False) if t.system_attrs[ORIGIN] == "a#1"),
                     {"stale_reason": "stale: test"}, None)  # s1's a#1 only
    expected = [[("a#0", "RUNNING"), ("a#1", "FAIL"), ("b#0", "RUNNING"), ("b#1", "WAITING")],
                [("a#0", "COMPLETE"), ("a#1", "RUNNING"), ("b#0", "RUNNING")]]
    a.sync()  # the owner fails its s1 trial in its own shard, and no other
    for storage in (drive(folder, "c"), a, b):
        states = [sorted((t.system_attrs[ORIGIN], t.state.name) for t in optuna.load_study(
            study_name=name, storage=storage).get_trials(deepcopy=False)) for name in ("s1", "s2")]
        assert states == expected, storage.shard_id
