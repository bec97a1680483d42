"""`sweeper accounts`: GPU-hours per account and platform, per week and day, checked against figures worked out by hand."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_cli
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

import sweeper.accounts as accounts_module
from sweeper.accounts import accounts, parse_allowances, trial_gpu_hours
from sweeper.record import LEASE, RESULT, STALE_REASON, WORKER
from sweeper.spec import load_spec
from sweeper.study import create_study, load_study

HOUR = dt.timedelta(hours=1)


def worker(account: str, platform: str, gpu: str) -> dict:
    return {"id": f"{account}/0a1b2c3d", "account": account, "platform": platform, "gpu": gpu}


def trials_from(monday: dt.datetime) -> list[tuple]:
    """(state, start, end, WORKER, RESULT, lease beat) around the week that starts at `monday`; GPU-hours by hand:
    alice/kaggle 1.0 last week + 3.0 + 0.5 + 0.25 this week; bob/colab 0.5 + 0.75 this week; unknown 0.1."""
    alice, bob = worker("alice", "kaggle", "Tesla T4"), worker("bob", "colab", "NVIDIA A100-SXM4-40GB")
    return [
        # last Saturday: 3,600 s on one GPU = 1.0
        (TrialState.COMPLETE, monday - 2 * 24 * HOUR, monday - 47 * HOUR, alice, {"wall_time_s": 3600.0, "gpus": 1}, None),
        # this Monday: 5,400 s on both T4s = 3.0 (its datetimes span longer: wall_time_s wins)
        (TrialState.COMPLETE, monday, monday + 2 * HOUR, alice, {"wall_time_s": 5400.0, "gpus": 2}, None),
        # preempted after half an hour: no wall time recorded, start to end = 0.5
        (TrialState.FAIL, monday + 3 * HOUR, monday + 3.5 * HOUR, alice, {"fail_reason": "preempted: deadline"}, None),
        # taken over: counts to its last heartbeat (0.25), not to the takeover an hour later
        (TrialState.FAIL, monday + 4 * HOUR, monday + 5.25 * HOUR, alice, {"fail_reason": "stale"}, monday + 4.25 * HOUR),
        (TrialState.COMPLETE, monday + HOUR, monday + 2 * HOUR, bob, {"wall_time_s": 1800.0}, None),  # 0.5
        (TrialState.RUNNING, monday + 6 * HOUR, None, bob, None, monday + 6.75 * HOUR),  # to its last beat: 0.75
        (TrialState.COMPLETE, monday + 7 * HOUR, monday + 8 * HOUR, None, {"wall_time_s": 360.0}, None),  # 0.1
        (TrialState.WAITING, None, None, None, None, None),  # enqueued, never run: not counted
    ]


def make_study(folder: Path, monday: dt.datetime) -> str:
    (folder / "sweep.toml").write_text(
        'study = "demo"\n[model]\nid = "m"\n[data]\nsource = "d.jsonl"\n[budget]\ntrain_tokens = 200_000\n')
    url = f"journal://{folder / 'sweep.log'}"
    create_study(load_spec(folder / "sweep.toml"), url)
    study, _ = load_study(url, "demo")
    for i, (state, start, end, who, result, beat) in enumerate(trials_from(monday)):
        attrs = {**({WORKER: who} if who else {}), **({RESULT: result} if result else {})}
        if result and result.get("fail_reason") == "stale":
            attrs[STALE_REASON] = "stale: no heartbeat from worker alice/0a1b2c3d for 3m (taken over)"
        study.add_trial(FrozenTrial(
            number=i, state=state, value=1.5 if state == TrialState.COMPLETE else None, datetime_start=start,
            datetime_complete=end, params={"learning_rate": 1e-4, "batch_size": 8},
            distributions={"learning_rate": FloatDistribution(3e-5, 2e-3, log=True),
                           "batch_size": CategoricalDistribution([8, 16, 32])},
            user_attrs=attrs, system_attrs={LEASE: {"at": beat.timestamp()}} if beat else {},
            intermediate_values={}, trial_id=i))
    return url


MONDAY = dt.datetime(2026, 12, 7)  # ISO week 2026-W50
NOW = MONDAY + 2 * 24 * HOUR  # Wednesday


@pytest.fixture(scope="module")
def fixed_week(tmp_path_factory) -> str:
    return make_study(tmp_path_factory.mktemp("accounts"), MONDAY)


def test_gpu_hours_per_account_week_and_day_match_the_hand_worked_figures(fixed_week):
    study, _ = load_study(fixed_week, "demo")
    figures = accounts(study, parse_allowances(["kaggle=30"]), now=NOW)
    assert figures["this_week"] == "2026-W50"
    totals = {(r["account"], r["platform"]): r for r in figures["accounts"]}
    assert set(totals) == {("alice", "kaggle"), ("bob", "colab"), ("?", "?")}
    alice, bob, unknown = totals["alice", "kaggle"], totals["bob", "colab"], totals["?", "?"]
    assert (alice["trials"], bob["trials"], unknown["trials"]) == (4, 2, 1)
    assert alice["gpu_hours"] == pytest.approx(4.75) and alice["this_week_gpu_hours"] == pytest.approx(3.75)
    assert alice["left_this_week_hours"] == pytest.approx(30 - 3.75) and alice["gpu_names"] == ["Tesla T4"]
    assert bob["gpu_hours"] == pytest.approx(1.25) and bob["this_week_gpu_hours"] == pytest.approx(1.25)
    assert bob["weekly_allowance_hours"] is None and bob["left_this_week_hours"] is None  # the allowance is Kaggle's
    assert unknown["gpu_hours"] == pytest.approx(0.1)
    weeks = {(r["week"], r["account"]): (r["trials"], pytest.approx(r["gpu_hours"])) for r in figures["weeks"]}
    assert weeks == {("2026-W49", "alice"): (1, 1.0), ("2026-W50", "alice"): (3, 3.75),
                     ("2026-W50", "bob"): (2, 1.25), ("2026-W50", "?"): (1, 0.1)}
    days = {(r["day"], r["account"]): (r["trials"], r["gpu_hours"]) for r in figures["days"]}
    assert days[("2026-12-05", "alice")] == (1, pytest.approx(1.0))
    assert days[("2026-12-07", "alice")] == (3, pytest.approx(3.75)) and days[("2026-12-07", "bob")] == (2, pytest.approx(1.25))


def test_a_bare_weekly_allowance_applies_to_every_platform_and_a_named_one_wins(fixed_week):
    study, _ = load_study(fixed_week, "demo")
    totals = {r["account"]: r for r in accounts(study, parse_allowances(["10", "kaggle=30"]), now=NOW)["accounts"]}
    assert totals["bob"]["left_this_week_hours"] == pytest.approx(10 - 1.25)
    assert totals["alice"]["left_this_week_hours"] == pytest.approx(30 - 3.75)


def sweeper(*args: str, columns: int = 80):
    return test_cli.sweeper(*args, env={"COLUMNS": str(columns)})


@pytest.fixture
def this_week(fixed_week, monkeypatch) -> str:
    """The fixed week's store, for the command, whose clock reads NOW: no figure moves if the suite runs over
    Sunday midnight."""
    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return NOW

    monkeypatch.setattr(accounts_module, "dt", SimpleNamespace(**{**vars(dt), "datetime": Frozen}))
    return fixed_week


@pytest.mark.parametrize("columns", [80, 200])
def test_accounts_table_fits_the_terminal_and_shows_what_is_left_of_the_allowance(this_week, columns):
    result = sweeper("accounts", "--store", this_week, "--weekly-hours", "kaggle=30", columns=columns)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= columns
    alice = next(line for line in lines if "alice" in line and "kaggle" in line and "Tesla T4" in line)
    assert [cell.strip() for cell in alice.split("│")[4:8]] == ["4", "4.75", "3.75", "26.25"]
    assert any("per week" in line for line in lines) and any("per day" in line for line in lines)


def test_accounts_json_holds_every_figure(this_week):
    result = sweeper("accounts", "--store", this_week, "--json")
    figures = json.loads(result.stdout)
    assert {r["account"]: round(r["gpu_hours"], 6) for r in figures["accounts"]} == {"alice": 4.75, "bob": 1.25, "?": 0.1}
    assert sum(r["trials"] for r in figures["days"]) == 7 and len(figures["weeks"]) == 4


@pytest.mark.parametrize("value", ["30h", "kaggle=", "-5", "kaggle=nan"])
def test_a_malformed_weekly_allowance_exits_2_in_one_line(this_week, value):
    result = sweeper("accounts", "--store", this_week, "--weekly-hours", value)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: --weekly-hours takes HOURS or PLATFORM=HOURS, e.g. 30 or kaggle=30 (got {value!r})"]


def test_a_running_trial_counts_on_its_workers_clock_whatever_the_readers_time_zone():
    """datetime_start is naive, on the worker's clock; the lease says when the trial began on that clock too."""
    started = dt.datetime(2026, 12, 7, 9, 0)  # as a worker five hours away from the reader wrote it
    lease = {"since": 1_000_000.0, "at": 1_000_000.0 + 1800, "beat": 30}
    trial = FrozenTrial(number=0, state=TrialState.RUNNING, value=None, datetime_start=started, datetime_complete=None,
                        params={}, distributions={}, user_attrs={}, system_attrs={LEASE: lease},
                        intermediate_values={}, trial_id=0)
    for reader_now in (started - 5 * HOUR, started + 5 * HOUR):
        assert trial_gpu_hours(trial, now=reader_now) == 0.5
        assert trial_gpu_hours(trial, default_gpus=2, now=reader_now) == 1.0
