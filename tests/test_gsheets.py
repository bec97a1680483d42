"""The gsheets:// store against a local Sheets server (tests/sheets_server.py) through the real gspread and google-auth.

Settle, sync, timeout and backoff times are scaled down by environment variables, as a user could set them.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import threading
import time
from collections import Counter

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import TrialState
from sheets_server import FakeSheets, RequestClock

from sweeper.errors import SweeperError, UserError
from sweeper.storage import open_storage
from sweeper.storage.google_auth import CREDENTIALS_ENV, find_credentials
from sweeper.storage.gsheets import (CELL_CHARS, JOURNAL, JournalChanged, backend_of, request_counts, spreadsheet_id,
                                     update_views)
from sweeper.storage.sheets_api import SheetsUnavailable, check_endpoint

FAST = {"SWEEPER_GSHEETS_SETTLE_S": "0.01", "SWEEPER_GSHEETS_SYNC_S": "0.3", "SWEEPER_GSHEETS_TIMEOUT_S": "0.5",
        "SWEEPER_GSHEETS_BACKOFF_S": "0.01", "SWEEPER_GSHEETS_BACKOFF_CAP_S": "0.05"}


def worker_env(fake: FakeSheets, account: dict, **overrides: str) -> dict[str, str]:
    """What a notebook would set: the credentials (here as JSON text) and, for tests only, the endpoint."""
    return {"SWEEPER_GSHEETS_ENDPOINT": fake.url, CREDENTIALS_ENV: json.dumps(account), **FAST, **overrides}


@pytest.fixture(autouse=True)
def _no_ambient_google(monkeypatch):
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "COLAB_RELEASE_TAG", CREDENTIALS_ENV, "SWEEPER_GSHEETS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def fake():
    with FakeSheets(latency=(0.0, 0.002), hang_s=0.6) as server:
        yield server


@pytest.fixture(scope="module")
def account(fake) -> dict:
    return fake.add_service_account()


def use(monkeypatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def sheet(fake, account, monkeypatch) -> str:
    """A fresh spreadsheet shared with the account, this process set up as a worker; returns the store URL."""
    use(monkeypatch, worker_env(fake, account))
    return f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}"


def sid_of(url: str) -> str:
    return spreadsheet_id(url)


# ---------------------------------------------------------------------------------------------
# Optuna's own storage behaviours


class TestOptunaStorageContract(StorageTestCase):
    """Optuna's storage test suite (studies, trials, params, values, attrs, pickling), on a sheet."""

    @pytest.fixture
    def storage(self, sheet):
        return open_storage(sheet)


def test_ask_tell_enqueue_report_prune_and_a_second_reader_sees_it_all(sheet):
    study = optuna.create_study(study_name="s", storage=open_storage(sheet),
                                pruner=optuna.pruners.ThresholdPruner(upper=0.5))
    study.enqueue_trial({"x": 0.25})
    for _ in range(4):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        trial.report(x, step=1)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, x)
    mine = [(t.number, t.state, t.params, t.intermediate_values) for t in study.trials]
    assert mine[0][2] == {"x": 0.25} and mine[0][1] == TrialState.COMPLETE
    assert all(s == (TrialState.PRUNED if p["x"] > 0.5 else TrialState.COMPLETE) for _, s, p, _ in mine)

    other = optuna.load_study(study_name="s", storage=open_storage(sheet))
    assert [(t.number, t.state, t.params, t.intermediate_values) for t in other.trials] == mine


def test_an_op_bigger_than_a_cell_is_split_and_joined(sheet, fake):
    storage = open_storage(sheet)
    study = optuna.create_study(storage=storage)
    big = "x" * (2 * CELL_CHARS + 10)
    study.set_user_attr("big", big)
    assert optuna.load_study(study_name=study.study_name, storage=open_storage(sheet)).user_attrs["big"] == big
    rows = fake.rows(sid_of(sheet), JOURNAL)
    assert [r[1] for r in rows if r[1].endswith("/3")] == ["1/3", "2/3", "3/3"]
    assert max(len(r[2]) for r in rows) <= CELL_CHARS


# ---------------------------------------------------------------------------------------------
# Quota: reads served from the cache, one read to open


def test_reads_between_syncs_come_from_the_cache_and_never_miss_our_own_write(sheet, fake):
    study = optuna.create_study(storage=open_storage(sheet))
    before = fake.stats["reads"]
    for i in range(50):
        study.set_user_attr(f"k{i % 2}", i) if i % 25 == 0 else None
        assert study.user_attrs.get("k0") == 0 and len(study.trials) == 0
    # Two writes, each read back once; the 48 other storage calls cost nothing.
    assert fake.stats["reads"] - before == 2
    assert request_counts(study._storage)["writes"] >= 3 and request_counts(object()) == {}


def test_another_workers_op_shows_up_after_the_sync_interval(sheet):
    study_a = optuna.create_study(study_name="s", storage=open_storage(sheet))
    study_b = optuna.load_study(study_name="s", storage=open_storage(sheet))
    study_a.set_user_attr("from", "a")
    deadline = time.monotonic() + 5
    while study_b.user_attrs.get("from") != "a":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_study_of_many_trials_opens_with_one_read_of_the_journal(sheet, fake, monkeypatch):
    monkeypatch.setenv("SWEEPER_GSHEETS_SETTLE_S", "0")  # a quick writer; the reader below settles as usual
    study = optuna.create_study(study_name="s", storage=open_storage(sheet))
    monkeypatch.setenv("SWEEPER_GSHEETS_SETTLE_S", FAST["SWEEPER_GSHEETS_SETTLE_S"])
    study.add_trials([optuna.trial.create_trial(params={"x": i / 100}, distributions={
        "x": optuna.distributions.FloatDistribution(0, 1)}, value=i) for i in range(100)])
    time.sleep(0.05)  # older than settle_s: nothing can still land among these rows
    reads, rows = fake.stats["reads"], fake.stats["writes"]
    loaded = optuna.load_study(study_name="s", storage=open_storage(sheet))
    assert len(loaded.trials) == 100
    # One read of the whole journal, one of its tail to confirm nothing landed late; no writes.
    assert fake.stats["reads"] - reads == 2 and fake.stats["writes"] == rows


# ---------------------------------------------------------------------------------------------
# Faults: duplicates, lost appends, timeouts after landing, 429, 5xx


def test_an_append_that_timed_out_after_landing_is_found_and_not_appended_again(sheet, fake):
    storage = open_storage(sheet)
    study = optuna.create_study(storage=storage)
    fake.inject("timeout", ":append")
    study.set_user_attr("k", "v")
    ops = [r for r in fake.rows(sid_of(sheet), JOURNAL)[1:] if '"k"' in r[2]]
    assert len(ops) == 1 and study.user_attrs == {"k": "v"}
    stats = backend_of(storage).stats
    assert stats["uncertain_appends"] == 1 and stats["reappends"] == 0


def test_an_append_lost_to_a_server_error_is_appended_again(sheet, fake):
    storage = open_storage(sheet)
    study = optuna.create_study(storage=storage)
    fake.inject("500", ":append")  # the fake answers 500 before writing anything
    study.set_user_attr("k", "v")
    assert study.user_attrs == {"k": "v"} and backend_of(storage).stats["reappends"] == 1
    assert len([r for r in fake.rows(sid_of(sheet), JOURNAL) if '"k"' in r[2]]) == 1


def test_a_repeated_op_id_is_dropped_first_copy_wins(sheet, fake):
    study = optuna.create_study(storage=open_storage(sheet))
    study.set_user_attr("k", "first")
    rows = fake.rows(sid_of(sheet), JOURNAL)
    copy = list(rows[-1])
    copy[2] = copy[2].replace('"first"', '"second"')
    fake.set_row(sid_of(sheet), JOURNAL, len(rows) + 1, copy)  # a retried append that landed twice
    reader = open_storage(sheet)
    assert optuna.load_study(study_name=study.study_name, storage=reader).user_attrs == {"k": "first"}
    assert backend_of(reader).stats["duplicates_dropped"] == 1


def test_429s_and_500s_are_retried_within_bounds(fake, account, monkeypatch):
    # Nothing here depends on the machine's speed: quota windows of 5 requests (RequestClock), faults from a seed,
    # no timeout a busy machine could hit, and no reads or waits on a timer (sync_s, settle_s); one writer.
    with FakeSheets(fault_rate=0.3, faults=("500", "429"), write_quota=3, read_quota=3, quota_window_s=0.25,
                    seed=1, clock=RequestClock(0.05)) as flaky:
        acct = flaky.add_service_account()
        use(monkeypatch, worker_env(flaky, acct, SWEEPER_GSHEETS_TIMEOUT_S="60", SWEEPER_GSHEETS_SYNC_S="3600",
                                    SWEEPER_GSHEETS_SETTLE_S="0"))
        url = f"gsheets://{flaky.add_spreadsheet(editors=[acct['client_email']])}"
        study = optuna.create_study(storage=open_storage(url))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
        assert len(study.trials) == 4
        assert flaky.stats["429_quota"] > 0 and flaky.stats["fault_500"] > 0 and flaky.stats["fault_429"] > 0


def test_retries_are_bounded_and_end_in_one_line(fake, account, monkeypatch):
    with FakeSheets(fault_rate=1.0, faults=("500",)) as down:
        acct = down.add_service_account()
        use(monkeypatch, worker_env(down, acct, SWEEPER_GSHEETS_ATTEMPTS="3"))
        with pytest.raises(SheetsUnavailable) as caught:
            open_storage(f"gsheets://{down.add_spreadsheet(editors=[acct['client_email']])}")
        assert "after 3 attempts (last: HTTP 500)" in str(caught.value) and "\n" not in str(caught.value)
        assert down.stats["reads"] == 3


# ---------------------------------------------------------------------------------------------
# Racing appends, the prefix invariant, rows edited by hand


@pytest.fixture
def racy(monkeypatch):
    with FakeSheets(mode="racy", latency=(0.0, 0.002)) as server:
        acct = server.add_service_account()
        use(monkeypatch, worker_env(server, acct))
        yield server, f"gsheets://{server.add_spreadsheet(editors=[acct['client_email']])}"


def _in_threads(*calls):
    errors: list[BaseException] = []

    def run(call):
        try:
            call()
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


def test_two_appends_landing_on_the_same_row_both_survive_in_one_order_for_every_reader(racy):
    fake, url = racy
    optuna.create_study(study_name="s", storage=open_storage(url))
    a, b = (optuna.load_study(study_name="s", storage=open_storage(url)) for _ in range(2))
    asked: list[optuna.Trial] = []
    with fake.race(2):  # b's create lands on a's row, pushing a's down
        _in_threads(lambda: asked.append(a.ask()), lambda: asked.append(b.ask()))
    assert fake.stats["racy_reorders"] == 1 and sorted(t.number for t in asked) == [0, 1]
    time.sleep(0.35)  # past sync_s: each has seen the other's trial
    seen = [[(t.number, t.datetime_start) for t in s.get_trials()] for s in (a, b)]
    fresh = optuna.load_study(study_name="s", storage=open_storage(url))
    assert len(seen[0]) == 2 and seen[0] == seen[1] == [(t.number, t.datetime_start) for t in fresh.trials]


def test_two_workers_never_run_the_same_enqueued_trial(racy):
    fake, url = racy
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    study.enqueue_trial({"x": 0.5})
    workers = [optuna.load_study(study_name="s", storage=open_storage(url)) for _ in range(2)]
    got: list[tuple[optuna.Study, optuna.Trial]] = []
    with fake.race(2):  # both claims of the waiting trial land on the same row
        _in_threads(*(lambda w=w: got.append((w, w.ask({"x": optuna.distributions.FloatDistribution(0, 1)})))
                      for w in workers))
    assert fake.stats["racy_reorders"] >= 1
    assert sorted((t.number, t.params["x"] == 0.5) for _, t in got) == [(0, True), (1, False)]
    for w, t in got:
        w.tell(t, 1.0)
    fresh = optuna.load_study(study_name="s", storage=open_storage(url))
    assert [t.state for t in fresh.trials] == [TrialState.COMPLETE] * 2


def test_a_replayed_row_that_changes_fails_loudly_and_blocks_writes(racy, monkeypatch):
    fake, url = racy
    monkeypatch.setenv("SWEEPER_GSHEETS_SETTLE_S", "0")  # trust every append: only the prefix check is left
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.set_user_attr("a", 1)
    rows = fake.rows(sid_of(url), JOURNAL)
    # An append that landed late, above rows already replayed (what settle_s exists to wait out).
    with fake.lock:
        fake.spreadsheets[sid_of(url)]["sheets"][JOURNAL].rows.insert(2, ["late:0", "1/1", rows[2][2]])
    time.sleep(0.35)  # past sync_s
    with pytest.raises(JournalChanged, match=r"changed at row 3, .*reload the study"):
        study.user_attrs  # noqa: B018
    writes = fake.stats["writes"]
    with pytest.raises(JournalChanged):
        study.set_user_attr("b", 2)
    assert fake.stats["writes"] == writes


@pytest.mark.parametrize("other_trial, fails", [(1, False), (0, True)])
def test_an_op_on_our_trial_replayed_ahead_must_commute_with_what_settles_before_it(sheet, fake, other_trial, fails):
    study = optuna.create_study(study_name="s", storage=open_storage(sheet))
    trial = study.ask()
    study.enqueue_trial({})  # trial 1, someone else's
    # Another worker's op lands, then ours; ours is replayed as soon as Sheets answers, before theirs settles.
    theirs = {"op_code": 8, "worker_id": "other-1", "trial_id": other_trial, "user_attr": {"by": "them"}}
    fake.set_row(sid_of(sheet), JOURNAL, len(fake.rows(sid_of(sheet), JOURNAL)) + 1,
                 ["other:0", "1/1", json.dumps(theirs)])
    trial.set_user_attr("by", "us")
    assert study.trials[0].user_attrs == {"by": "us"}
    time.sleep(0.35)  # past sync_s: the next read settles both rows, theirs first
    if fails:
        with pytest.raises(JournalChanged, match=r"journal row 5 .* landed before an op of this worker"):
            study.trials  # noqa: B018
    else:
        assert [t.user_attrs for t in study.trials] == [{"by": "us"}, {"by": "them"}]


def test_a_row_edited_by_hand_stops_the_reader_naming_the_row(sheet, fake):
    study = optuna.create_study(study_name="s", storage=open_storage(sheet))
    study.set_user_attr("a", 1)
    fake.set_row(sid_of(sheet), JOURNAL, 3, ["x:1", "1/1", "{not json"])
    with pytest.raises(SweeperError, match=r"journal row 3 of spreadsheet .* does not parse .*Version history"):
        open_storage(sheet)


def test_a_deleted_header_row_is_refused_rather_than_shifting_every_op(sheet, fake):
    optuna.create_study(study_name="s", storage=open_storage(sheet))
    with fake.lock:
        del fake.spreadsheets[sid_of(sheet)]["sheets"][JOURNAL].rows[0]
    with pytest.raises(SweeperError, match=r"journal row 1 of spreadsheet .* \(it must be the header: op id \| chunk"):
        open_storage(sheet)


def test_sweeper_init_prepares_the_sheet_and_a_worker_reads_the_spec_back(sheet, fake, spec_toml):
    from sweeper.spec import load_spec
    from sweeper.study import create_study, enqueue, grid_points, load_study

    spec = load_spec(spec_toml)
    assert create_study(spec, sheet)[1] == "created"
    assert create_study(spec, sheet)[1] == "exists, unchanged"
    sheets = fake.spreadsheets[sid_of(sheet)]["sheets"]
    assert {"journal", "trials", "workers"} <= set(sheets)
    assert fake.rows(sid_of(sheet), "workers")[0][0] == "worker"
    study, loaded = load_study(sheet, "demo", worker_seed=1)
    assert loaded == spec
    assert len(enqueue(study, sheet, grid_points(spec))) == 8 and len(enqueue(study, sheet, grid_points(spec))) == 0


# ---------------------------------------------------------------------------------------------
# Credentials and the one-line errors


def test_no_credentials_anywhere_says_where_to_put_them(on_kaggle):
    with pytest.raises(UserError, match=f"no Google credentials .*{CREDENTIALS_ENV}.*authenticate_user.*Kaggle"):
        find_credentials()


def test_credentials_come_from_the_env_before_notebook_secrets(account, on_kaggle, monkeypatch, tmp_path):
    on_kaggle.secrets(**{CREDENTIALS_ENV: json.dumps({**account, "client_email": "from-the-secret@x.iam"})})
    path = tmp_path / "key.json"
    path.write_text(json.dumps(account))
    monkeypatch.setenv(CREDENTIALS_ENV, str(path))
    assert find_credentials().email == account["client_email"]
    monkeypatch.delenv(CREDENTIALS_ENV)
    found = find_credentials()
    assert (found.source, found.email) == (f"Kaggle secret {CREDENTIALS_ENV}", "from-the-secret@x.iam")


def test_a_colab_secret_the_notebook_may_not_read_says_to_turn_on_its_access(account, on_colab):
    on_colab.secrets(**{CREDENTIALS_ENV: (json.dumps(account), False)})
    with pytest.raises(UserError, match=f"^the Colab secret {CREDENTIALS_ENV} exists but this notebook may not read "
                                        "it: turn on its \"Notebook access\" switch"):
        find_credentials()


def test_kaggle_offline_says_to_turn_the_internet_on(on_kaggle, monkeypatch):
    monkeypatch.setenv("SWEEPER_FAKE_KAGGLE_INTERNET", "off")
    with pytest.raises(UserError, match="^Kaggle's secrets service is unreachable: turn on Settings > Internet"):
        find_credentials()


def test_colab_login_is_used_when_on_colab(on_colab, monkeypatch):
    import google.auth

    sentinel = object()
    monkeypatch.setattr(google.auth, "default", lambda scopes: (sentinel, "project"))
    found = find_credentials()
    assert found.credentials is sentinel and found.email is None and "signed in" in found.who


@pytest.mark.parametrize("text, says", [
    ('{"type": "service_account", "client_email": "a@b", "private_key": "garbage", "token_uri": "x"}', "does not load"),
    ('{"type": "authorized_user"}', "not a service-account key"),
    ("{not json", "does not parse"),
    ("/no/such/key.json", "neither service-account JSON nor an existing file"),
    # A quoted or base64 key is no file name (too long for one) and is never shown.
    ("'" + "garbage" * 60 + "'", r"neither service-account JSON nor an existing file: \(value not shown\)"),
    ("ya29.garbage-token", r"\(value not shown\)"),
])
def test_unusable_credentials_are_a_user_error_that_never_echoes_the_key(text, says, monkeypatch):
    monkeypatch.setenv(CREDENTIALS_ENV, text)
    with pytest.raises(UserError, match=says) as caught:
        find_credentials()
    assert "garbage" not in str(caught.value)


def test_a_sheet_not_shared_with_the_account_says_whom_to_share_it_with(fake, account, monkeypatch):
    use(monkeypatch, worker_env(fake, account))
    with pytest.raises(UserError) as caught:
        open_storage(f"gsheets://{fake.add_spreadsheet(editors=[])}")
    assert f"share the sheet with {account['client_email']} as Editor" in str(caught.value)


def test_a_wrong_spreadsheet_id_is_a_user_error(fake, account, monkeypatch):
    use(monkeypatch, worker_env(fake, account))
    with pytest.raises(UserError, match="spreadsheet 'nosuchsheet' not found: check the ID"):
        open_storage("gsheets://nosuchsheet")


def test_revoked_credentials_are_one_line_without_key_or_token(fake, monkeypatch):
    acct = fake.add_service_account()
    use(monkeypatch, worker_env(fake, acct))
    url = f"gsheets://{fake.add_spreadsheet(editors=[acct['client_email']])}"
    storage = open_storage(url)
    fake.revoke(acct["client_email"])
    with pytest.raises(UserError) as caught:
        open_storage(url)
    message = str(caught.value)
    assert "refused the credentials" in message and "revoked" in message and "\n" not in message
    key_line = acct["private_key"].splitlines()[1]
    token = backend_of(storage)._client().session.credentials.token
    assert key_line not in message and token not in message and "ya29" not in message


def test_the_endpoint_override_is_https_or_this_machine_only():
    assert check_endpoint("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert check_endpoint("https://sheets.example.com") == "https://sheets.example.com"
    with pytest.raises(UserError, match="https:// URL or http:// to localhost"):
        check_endpoint("http://evil.example.com")


@pytest.mark.parametrize("url, sid", [
    ("gsheets://1AbC-d_E", "1AbC-d_E"),
    ("gsheets://docs.google.com/spreadsheets/d/1AbC-d_E/edit#gid=0", "1AbC-d_E"),
])
def test_the_url_takes_an_id_or_the_sheets_address(url, sid):
    assert spreadsheet_id(url) == sid


def test_a_url_without_an_id_is_a_user_error():
    with pytest.raises(UserError, match="gsheets store needs a spreadsheet ID"):
        open_storage("gsheets://")


def test_the_backend_pickles_without_credentials_and_reconnects(sheet):
    storage = open_storage(sheet)
    optuna.create_study(study_name="s", storage=storage)
    state = pickle.dumps(backend_of(storage))
    assert b"PRIVATE KEY" not in state
    restored = JournalStorage(pickle.loads(state))
    assert [s.study_name for s in restored.get_all_studies()] == ["s"]


# ---------------------------------------------------------------------------------------------
# The views


def test_views_mirror_trials_and_workers_and_come_back_when_deleted(sheet, fake, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPER_GSHEETS_VIEWS_S", "0.2")
    storage = open_storage(sheet)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-3, log=True)
    trial.set_user_attr("worker", {"account": "ana", "gpu": "T4"})
    info = {"worker": "ana/1", "account": "ana", "platform": "colab", "gpu": "T4", "trial": 0, "gpu_hours": 0.5}
    assert update_views(storage, study, info) == 2  # first row append + one batch update
    assert update_views(storage, study, info) == 0  # nothing changed: no request
    sid = sid_of(sheet)
    assert fake.rows(sid, "trials")[0] == ["trial", "state", "lr", "value", "account", "GPU", "wall s"]
    assert fake.rows(sid, "trials")[1][:2] == [0, "RUNNING"] and fake.rows(sid, "trials")[1][4:6] == ["ana", "T4"]
    assert fake.rows(sid, "workers")[1][:5] == ["ana/1", "ana", "colab", "T4", 0]

    fake.delete_sheet(sid, "workers")
    study.tell(trial, 0.3)
    done = {**info, "trial": None, "gpu_hours": 0.7}
    assert update_views(storage, study, done) == 0  # changes wait for views_s
    time.sleep(0.25)
    assert update_views(storage, study, done) >= 2  # the sheet back, this worker's row, the trials table
    assert fake.rows(sid, "workers")[1][:5] == ["ana/1", "ana", "colab", "T4", ""]
    assert fake.rows(sid, "workers")[1][6] == 0.7
    assert fake.rows(sid, "trials")[1][:4] == [0, "COMPLETE", trial.params["lr"], 0.3]

    other = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'x.db'}"))
    assert update_views(other._storage, other, info) == 0


# ---------------------------------------------------------------------------------------------
# Many workers, faults, both append modes


N_WORKERS, N_TRIALS, N_ENQUEUED = 8, 5, 8


def run_worker(url: str, env: dict[str, str], seed: int, out) -> None:
    """One worker process: ask -> report -> (prune) -> tell, N_TRIALS times."""
    import os

    os.environ.update(env)
    try:
        storage = open_storage(url)
        study = optuna.load_study(study_name="race", storage=storage)
        done = []
        for _ in range(N_TRIALS):
            trial = study.ask()
            x = trial.suggest_float("x", 0, 1)
            trial.report(x, step=1)
            trial.set_user_attr("by", seed)
            state = TrialState.PRUNED if trial.should_prune() else TrialState.COMPLETE
            study.tell(trial, x if state == TrialState.COMPLETE else None, state=state)
            done.append((trial.number, x, state.name))
        out.put((seed, done, dict(backend_of(storage).stats), None))
    except BaseException as e:  # noqa: BLE001  (reported to the test)
        out.put((seed, [], {}, f"{type(e).__name__}: {e}"))


# An append that lands later than settle_s after it was sent, aimed at a row picked on arrival, would land among
# rows already replayed: the readers detect it (JournalChanged) but cannot absorb it, so "late" faults are for
# the serialized mode, where a late copy lands at the end and is dropped as a duplicate.
@pytest.mark.parametrize("mode, faults", [("serialized", ("500", "429", "timeout", "late")),
                                          ("racy", ("500", "429", "timeout"))])
def test_eight_workers_times_five_trials_under_faults_lose_and_repeat_nothing(mode, faults, capsys):
    with FakeSheets(mode=mode, latency=(0.0, 0.01), fault_rate=0.1, faults=faults, hang_s=0.4, read_quota=20,
                    write_quota=20, quota_window_s=0.5, seed=7) as fake:
        accounts = [fake.add_service_account() for _ in range(2)]  # two people, four notebooks each
        url = f"gsheets://{fake.add_spreadsheet(editors=[a['client_email'] for a in accounts])}"
        envs = [worker_env(fake, accounts[i % 2], SWEEPER_GSHEETS_SETTLE_S="0.1", SWEEPER_GSHEETS_TIMEOUT_S="0.3",
                           SWEEPER_GSHEETS_BACKOFF_S="0.05", SWEEPER_GSHEETS_BACKOFF_CAP_S="0.5",
                           SWEEPER_GSHEETS_SYNC_S="1") for i in range(N_WORKERS)]
        fake.fault_rate = 0.0  # set-up runs clean
        with pytest.MonkeyPatch.context() as mp:
            use(mp, envs[0])
            study = optuna.create_study(study_name="race", storage=open_storage(url))
            for i in range(N_ENQUEUED):
                study.enqueue_trial({"x": i / 10})
        fake.fault_rate = 0.1
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        procs = [ctx.Process(target=run_worker, args=(url, envs[i], i, out)) for i in range(N_WORKERS)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert [r[3] for r in results] == [None] * N_WORKERS
        fake.fault_rate = 0.0
        fake.wait_idle()  # late appends still landing
        with pytest.MonkeyPatch.context() as mp:
            use(mp, envs[0])
            reader = open_storage(url)
            trials = optuna.load_study(study_name="race", storage=reader).trials
        ids = [(r[0], r[1]) for r in fake.rows(sid_of(url), JOURNAL)[1:]]
        duplicate_rows = len(ids) - len(set(ids))
        assert backend_of(reader).stats["duplicates_dropped"] == duplicate_rows

    told = sorted((number, x, state) for _, done, _, _ in results for number, x, state in done)
    assert len(trials) == len(told) == N_WORKERS * N_TRIALS
    assert [t.number for t in trials] == [n for n, _, _ in told] == list(range(N_WORKERS * N_TRIALS))
    assert [(t.number, t.params["x"], t.state.name) for t in trials] == told  # no lost or crossed result
    assert all(t.user_attrs["by"] == by for by, done, _, _ in results for t in trials if t.number in
               {n for n, _, _ in done})
    enqueued = sorted(t.params["x"] for t in trials if "fixed_params" in t.system_attrs)
    assert enqueued == [i / 10 for i in range(N_ENQUEUED)]  # each enqueued point ran exactly once
    stats = sum((Counter(r[2]) for r in results), Counter())
    with capsys.disabled():
        print(f"\n[{mode}] faults injected: 500={fake.stats['fault_500']} 429={fake.stats['fault_429']} "
              f"timeout-after-write={fake.stats['fault_timeout']} late={fake.stats['fault_late']} "
              f"quota-429={fake.stats['429_quota']} "
              f"racy reorders={fake.stats['racy_reorders']} | workers: requests={stats['reads'] + stats['writes']} "
              f"retries={stats['retries']} uncertain appends={stats['uncertain_appends']} "
              f"re-appends={stats['reappends']} duplicate rows in the sheet={duplicate_rows} (dropped by every reader) "
              f"ops ahead={stats['ops_ahead']} | longest append landing {fake.max_land_s * 1000:.0f} ms")
    assert fake.max_land_s < 0.1  # the test's settle_s covered every racing append


def test_the_real_worker_runs_qlora_trials_on_a_sheet_and_fills_its_views(sheet, fake, tmp_path, monkeypatch):
    from runner import run_worker
    from runner.demo import prepare_demo
    from sweeper.spec import load_spec
    from sweeper.study import create_study, load_study

    monkeypatch.setenv("SWEEPER_GSHEETS_VIEWS_S", "0")
    sweep = prepare_demo(tmp_path / "demo", n_trials=2)
    sweep.write_text(sweep.read_text().replace("train_tokens = 60_000", "train_tokens = 4_000"))
    create_study(load_spec(sweep), sheet)

    summary = run_worker(sheet, "demo", account="ana", checkpoint_root=str(tmp_path / "ck"), log=lambda s: None)

    assert summary.trials == [0, 1]
    study, _ = load_study(sheet, "demo")  # a fresh reader of the sheet
    assert [t.state.name for t in study.get_trials()] in (["COMPLETE", "COMPLETE"], ["COMPLETE", "PRUNED"])
    assert study.trials[0].user_attrs["worker"]["account"] == "ana"
    sid = sid_of(sheet)
    assert [row[:2] for row in fake.rows(sid, "trials")[1:]] == [[0, t.state.name] for t in study.trials[:1]] + [
        [1, study.trials[1].state.name]]
    worker_row = fake.rows(sid, "workers")[1]
    assert worker_row[:4] == [summary.worker_id, "ana", "local", "cpu"] and worker_row[4] == ""
