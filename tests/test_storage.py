"""Store URLs: parsed into the right Optuna storage, refused with one clear line, never leaking a password."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sweeper.errors import SweeperError, UserError
from sweeper.storage import open_storage, redact, store_lock, supported
from sweeper.storage.local import journal_path, sqlite_path

SCHEMES = ["sqlite:///path.db", "journal:///path.log", "postgresql://", "mysql://", "redis://", "grpc://host:port"]


# ---------------------------------------------------------------------------------------------
# Which URLs are refused, and how


@pytest.mark.parametrize("url", ["ftp://host/x", "s3://bucket/sweep.db", "file:///tmp/x.db", "gsheet://id"])
def test_unknown_scheme_is_a_user_error_listing_supported_schemes(url):
    with pytest.raises(UserError) as caught:
        open_storage(url)
    message = str(caught.value)
    assert f"unknown store scheme {url.split(':')[0]!r}" in message
    assert all(s in message for s in SCHEMES)


@pytest.mark.parametrize("url", ["", "sweep.db", "/tmp/sweep.db", "sqlite:/x.db", "://x", "localhost:5432"])
def test_malformed_url_is_a_user_error_listing_supported_schemes(url):
    with pytest.raises(UserError) as caught:
        open_storage(url)
    assert "malformed store URL" in str(caught.value)
    assert f"supported: {supported()}" in str(caught.value)


def test_unknown_scheme_error_hides_the_password():
    with pytest.raises(UserError) as caught:
        open_storage("mongodb://admin:hunter2@db.example/x")
    assert "hunter2" not in str(caught.value) and "admin:***@" in str(caught.value)


@pytest.mark.parametrize("url", ["grpc://host", "grpc://:50051", "grpc://host:port"])
def test_grpc_url_without_host_and_port_is_a_user_error(url):
    with pytest.raises(UserError, match="grpc store needs host and port"):
        open_storage(url)


# ---------------------------------------------------------------------------------------------
# sqlite:// and journal:// paths


def test_sqlite_three_slashes_is_relative_and_four_absolute():
    assert sqlite_path("sqlite:///sweeps/x.db") == Path("sweeps/x.db")
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://x.db"])
def test_sqlite_without_a_file_is_a_user_error(url):
    with pytest.raises(UserError, match="sqlite store needs a file"):
        open_storage(url)


def test_sqlite_relative_path_is_resolved_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = open_storage("sqlite:///rel.db", create=True)
    optuna.create_study(study_name="s", storage=storage)
    assert (tmp_path / "rel.db").is_file()


def test_sqlite_absolute_path_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere" / "abs.db"
    target.parent.mkdir()
    optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{target}", create=True))
    assert target.is_file() and not (tmp_path / "abs.db").exists()


def test_journal_three_slashes_is_absolute_and_two_relative():
    assert journal_path("journal:///abs/x.log") == Path("/abs/x.log")
    assert journal_path("journal://x.log") == Path("x.log")
    assert journal_path("journal://logs/x.log") == Path("logs/x.log")


@pytest.mark.parametrize("url", ["journal://", "journal:///", "journal:///tmp/logs/"])
def test_journal_without_a_file_is_a_user_error(url):
    with pytest.raises(UserError, match="journal store needs a file"):
        open_storage(url)


def test_journal_relative_path_is_resolved_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    optuna.create_study(study_name="s", storage=open_storage("journal://rel.log", create=True))
    assert (tmp_path / "rel.log").is_file()


@pytest.mark.parametrize("kind", ["sqlite:///", "journal://"])
def test_missing_parent_folder_is_a_user_error_and_creates_nothing(tmp_path, kind):
    missing = tmp_path / "no" / "such"
    with pytest.raises(UserError) as caught:
        open_storage(f"{kind}{missing / 'sweep.db'}", create=True)
    assert f"folder {missing} does not exist" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_store_persists_a_study_across_opens(store_url):
    study = optuna.create_study(study_name="kept", storage=open_storage(store_url))
    study.enqueue_trial({"x": 1.0})
    again = optuna.load_study(study_name="kept", storage=open_storage(store_url))
    assert [t.system_attrs["fixed_params"] for t in again.get_trials()] == [{"x": 1.0}]


def test_store_lock_is_a_usable_context_for_every_kind(store_url):
    with store_lock(store_url):
        pass
    with store_lock("redis://:pw@host:6379/0"):  # a store without a lock of its own: a no-op
        pass


# ---------------------------------------------------------------------------------------------
# Passwords never printed


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://user:secret@host:5432/db", "postgresql://user:***@host:5432/db"),
        ("mysql+pymysql://root:s3cr:et@host/db", "mysql+pymysql://root:***@host/db"),
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("postgresql://u:PLANTED@PW123@host/db", "postgresql://u:***@host/db"),  # an unencoded '@': up to the last
        ("u:PLANTED@PW123@host/db", "u:***@host/db"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("grpc://host:50051", "grpc://host:50051"),
        ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
        ("postgresql://u@h/db?sslmode=require&sslpassword=pw&password=x#f",
         "postgresql://u@h/db?sslmode=require&sslpassword=***&password=***#f"),
        ("", ""),
    ],
)
def test_redact_hides_only_the_password(url, shown):
    assert redact(url) == shown


def test_unreachable_postgres_error_never_contains_the_password():
    url = "postgresql://user:secret@127.0.0.1:1/db"
    with pytest.raises(SweeperError) as caught:
        open_storage(url)
    message = str(caught.value)
    assert "secret" not in message
    # Either the driver is missing (bad setup, exit 2) or the server refused (runtime, exit 1).
    assert "not installed" in message or "postgresql://user:***@127.0.0.1:1/db" in message


def test_missing_redis_client_or_server_error_never_contains_the_password():
    with pytest.raises(Exception) as caught:  # UserError without the client; the client's own error without a server
        open_storage("redis://:secret@127.0.0.1:1/0").get_all_studies()
    assert "secret" not in str(caught.value)


def test_a_malformed_url_without_a_scheme_never_echoes_its_password():
    from sweeper.errors import UserError
    from sweeper.storage import open_storage

    with pytest.raises(UserError, match="malformed store URL") as caught:
        open_storage("user:secret@db.example/sweeps")
    assert "secret" not in str(caught.value) and "user:***@db.example" in str(caught.value)
