"""Optuna's own server stores: postgresql://, mysql://, redis://, grpc://host:port.

For teams that outgrow the sheet. Passwords in the URL never reach an error message.
"""

from __future__ import annotations

import re

from optuna.storages import BaseStorage, GrpcStorageProxy, JournalStorage, RDBStorage
from optuna.storages.journal import JournalRedisBackend

from sweeper.errors import SweeperError, UserError
from sweeper.storage import Backend, redact, register

DRIVERS = {"postgresql": "psycopg2-binary (pip install 'sweeper[postgres]')", "mysql": "PyMySQL",
           "redis": "redis"}


def _first_line(e: Exception, url: str) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.replace(url, redact(url))


# The drivers DRIVERS names. SQLAlchemy's own default for a bare scheme differs (2.1: psycopg 3 for
# postgresql, mysqlclient for mysql), so installing the named package would not fix a bare URL.
DEFAULT_DRIVER = {"postgresql": "psycopg2", "mysql": "pymysql"}


def open_rdb(url: str) -> BaseStorage:
    scheme, rest = url.split("://", 1)
    engine_url = f"{scheme}+{DEFAULT_DRIVER[scheme]}://{rest}" if scheme in DEFAULT_DRIVER else url
    try:
        return RDBStorage(engine_url, engine_kwargs={"pool_pre_ping": True})
    except ImportError:  # Optuna re-raises a missing DB driver as ImportError
        scheme = url.split(":", 1)[0].split("+")[0]
        raise UserError(f"the {scheme} driver is not installed; install {DRIVERS[scheme]}") from None
    except Exception as e:
        raise SweeperError(f"cannot open store {redact(url)}: {_first_line(e, engine_url)}") from None


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
        return GrpcStorageProxy(host=match.group(1), port=int(match.group(2)))
    except ImportError:
        raise UserError("the grpc client is not installed; install optuna[grpc]") from None


register(Backend("postgresql", "postgresql://user:pass@host/db", "a team's server", open_rdb))
register(Backend("mysql", "mysql://user:pass@host/db", "a team's server", open_rdb))
register(Backend("redis", "redis://host:6379", "a team's server", open_redis))
register(Backend("grpc", "grpc://host:port", "a team's server (optuna grpc proxy)", open_grpc))
