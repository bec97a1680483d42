"""Optuna's own server stores: postgresql://, mysql://, redis://, grpc://host:port.

For teams that outgrow the sheet. Passwords in the URL never reach an error message.
postgresql:// also has a store lock (a PostgreSQL advisory lock), so concurrent enqueues never add a
point twice; the other server stores have none.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import warnings
import zlib
from collections.abc import Iterator

from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, GrpcStorageProxy, JournalStorage, RDBStorage
from optuna.storages.journal import JournalRedisBackend

from sweeper.errors import SweeperError, UserError, env_number, first_line
from sweeper.storage.registry import Backend, redact, register

DRIVERS = {"postgresql": "psycopg2-binary (pip install 'sweeper-qlora[postgres]')", "mysql": "PyMySQL",
           "redis": "redis"}


def _first_line(e: Exception, url: str) -> str:
    text = first_line(e)
    return text.replace(url, redact(url))


# The drivers DRIVERS names. SQLAlchemy's own default for a bare scheme differs (2.1: psycopg 3 for
# postgresql, mysqlclient for mysql), so installing the named package would not fix a bare URL.
DEFAULT_DRIVER = {"postgresql": "psycopg2", "mysql": "pymysql"}


def _engine_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}+{DEFAULT_DRIVER[scheme]}://{rest}" if scheme in DEFAULT_DRIVER else url


def _connect_args(url: str) -> dict[str, int]:
    """A connect timeout (SWEEPER_CONNECT_TIMEOUT_S, default 30 s) unless the URL sets one: libpq waits forever by
    default, and a host that drops packets then held a worker for minutes before saying anything."""
    if "connect_timeout=" in url:
        return {}
    return {"connect_timeout": math.ceil(env_number("SWEEPER_CONNECT_TIMEOUT_S", 30, positive=True))}  # libpq: whole s


def _check_rdb_url(url: str, engine_url: str) -> None:
    """A URL SQLAlchemy cannot parse is bad input (exit 2), said before any driver sees it: a port that is no number,
    or a password with an unencoded '@' (SQLAlchemy would take the rest of the password for the host, and the driver's
    message would print it)."""
    from sqlalchemy.engine import make_url

    userinfo = url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[0]  # user:password, up to the last '@'
    if "@" in userinfo:
        raise UserError(f"malformed store URL {redact(url)}: its password holds an '@'; write it as %40 "
                        "(percent-encoded), or the rest of the password is taken for the host")
    try:
        parsed = make_url(engine_url)
        parsed.port  # noqa: B018  parsed lazily on some versions
    except ValueError:
        port = re.search(r"^[^@/]*:([^/?]*)", url.split("://", 1)[-1].rpartition("@")[2])
        what = f"port {port.group(1)!r} is not a number" if port else "it does not parse"
        raise UserError(f"malformed store URL {redact(url)}: {what} "
                        "(scheme://user:password@host:port/database)") from None
    except Exception as e:  # noqa: BLE001  sqlalchemy.exc.ArgumentError and friends
        raise UserError(f"malformed store URL {redact(url)}: {first_line(e).replace(url, redact(url))}") from None


def open_rdb(url: str) -> BaseStorage:
    engine_url = _engine_url(url)
    _check_rdb_url(url, engine_url)
    connect_args = _connect_args(url)
    try:
        return RDBStorage(engine_url, engine_kwargs={"pool_pre_ping": True, "connect_args": connect_args})
    except ImportError:  # Optuna re-raises a missing DB driver as ImportError
        scheme = url.split(":", 1)[0].split("+")[0]
        raise UserError(f"the {scheme} driver is not installed; install {DRIVERS[scheme]}") from None
    except Exception as e:
        raise SweeperError(f"cannot open store {redact(url)}: {_first_line(e, engine_url)}") from None


# Advisory locks live in one database's lock space: this key is "the store" for every client of it.
LOCK_KEY = zlib.crc32(b"sweeper.store_lock")


@contextlib.contextmanager
def postgres_lock(url: str) -> Iterator[None]:
    """A session-level advisory lock, held on a connection of its own for the with-block.

    Every client of the database, on any machine, waits for it. The connection is in autocommit, so it
    never sits idle in a transaction; closing it ends the session, which releases the lock, and so does
    the server when this process dies.
    """
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine_url = _engine_url(url)
    connect_args = _connect_args(url)
    try:
        engine = sqlalchemy.create_engine(engine_url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                                          connect_args=connect_args)
    except ImportError:
        raise UserError(f"the postgresql driver is not installed; install {DRIVERS['postgresql']}") from None
    conn = None
    try:
        try:
            conn = engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise SweeperError(f"cannot lock store {redact(url)}: {_first_line(e, engine_url)}") from None
        yield
    finally:
        if conn is not None:
            conn.close()  # NullPool: the connection really closes, and the session's lock goes with it
        engine.dispose()


def open_redis(url: str) -> BaseStorage:
    try:
        return JournalStorage(JournalRedisBackend(url))
    except ImportError:  # Optuna's lazy import raises a plain ImportError
        raise UserError(f"the redis client is not installed; install {DRIVERS['redis']}") from None
    except Exception as e:
        raise SweeperError(f"cannot open store {redact(url)}: {_first_line(e, url)}") from None


def open_grpc(url: str) -> BaseStorage:
    match = re.fullmatch(r"grpc://([^:/]+):(\d+)/?", url)
    if not match:
        raise UserError(f"grpc store needs host and port: grpc://host:port (got {url!r})")
    try:
        with warnings.catch_warnings():  # "GrpcStorageProxy is experimental": nothing for a user to act on
            warnings.simplefilter("ignore", ExperimentalWarning)
            proxy = GrpcStorageProxy(host=match.group(1), port=int(match.group(2)))
    except ImportError:
        raise UserError("the grpc client is not installed; install optuna[grpc]") from None
    # The proxy connects at its first call, and a server that is not there fails it with a page of gRPC traceback:
    # wait for the server first, as long as the other server stores wait to connect.
    seconds = env_number("SWEEPER_CONNECT_TIMEOUT_S", 30, positive=True)
    try:
        proxy.wait_server_ready(timeout=seconds)
    except ConnectionError:
        raise SweeperError(f"cannot open store {redact(url)}: no gRPC server answered within {seconds:g} s "
                           "(SWEEPER_CONNECT_TIMEOUT_S)") from None
    return proxy


def _lacks(module: str, install: str):
    """A registry `missing` hook: whether this install has the module, asked without importing it."""
    def missing() -> str | None:
        return None if importlib.util.find_spec(module) is not None else f"pip install {install}"
    return missing


register(Backend("postgresql", "postgresql://user:pass@host/db", "a team's server", open_rdb, postgres_lock,
                 missing=_lacks("psycopg2", "'sweeper-qlora[postgres]'")))
register(Backend("mysql", "mysql://user:pass@host/db", "a team's server", open_rdb,
                 missing=_lacks("pymysql", "PyMySQL")))
register(Backend("redis", "redis://host:6379", "a team's server", open_redis, missing=_lacks("redis", "redis")))
register(Backend("grpc", "grpc://host:port", "a team's server (optuna grpc proxy)", open_grpc,
                 missing=_lacks("grpc", "'optuna[grpc]'")))
