"""A real, throwaway PostgreSQL server for the test session: the `postgres_url` fixture.

initdb into a fresh folder, listen on 127.0.0.1 on a free port (its unix socket in that folder too),
fsync off, and a role `sweeper` with a password (so every error message is checked for it) that owns
the database `sweeps` and may create more. Stopped and removed at the end of the session.

Without the server binaries (Debian: apt-get install postgresql) the tests using it are skipped,
unless SWEEPER_REQUIRE_POSTGRES=1 (CI sets it), which makes that an error instead.
initdb refuses to run as root: as root, the server runs as the `postgres` system user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

USER, PASSWORD, DATABASE = "sweeper", "secret", "sweeps"
REQUIRE_ENV = "SWEEPER_REQUIRE_POSTGRES"


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin."""
    candidates = []
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            candidates.append(Path(out))  # Debian's pg_config comes with libpq-dev, maybe without the server
    version = lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)]  # noqa: E731
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    return next((d for d in candidates if all(os.access(d / b, os.X_OK) for b in ("initdb", "pg_ctl"))), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(why: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why}; {REQUIRE_ENV}=1 requires the postgresql:// store tests to run", pytrace=False)
    pytest.skip(why)


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.as_postgres = os.geteuid() == 0  # initdb refuses root
        # A short path under /tmp: a unix socket path is limited to about 100 characters, and as root the
        # folder must be reachable by the postgres user (pytest's own temp folders are root-only).
        self.base = Path(tempfile.mkdtemp(prefix="sweeper-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.data, self.log = self.base / "data", self.base / "server.log"
        self.port = 0
        if self.as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)

    def run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # cwd: the postgres user may not be allowed into the caller's working folder
        done = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            log = self.log_text()[-2000:]
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}")

    def start(self) -> None:
        self.run("initdb", "-D", str(self.data), "--username=postgres", "--auth-local=trust",
                 "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{self.base}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        for attempt in range(3):  # the free port may be taken between asking and binding
            self.port = free_port()
            try:
                self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", f"-p {self.port}", "-w", "-t", "30",
                         "start")
                break
            except RuntimeError:
                if attempt == 2 or "already in use" not in self.log_text():
                    raise

        import psycopg2  # the test extra installs it

        admin = psycopg2.connect(host=str(self.base), port=self.port, user="postgres", dbname="postgres")
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f"CREATE ROLE {USER} LOGIN CREATEDB PASSWORD '{PASSWORD}'")
                cur.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        finally:
            admin.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():  # also a server that started too slowly for pg_ctl -w
                self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """postgresql://sweeper:secret@127.0.0.1:PORT/sweeps on a server of this session's own."""
    bindir = find_bindir()
    if bindir is None:
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                     "install them (Debian: apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root, and there is no `postgres` system user to run the PostgreSQL server as")
    server = PostgresServer(bindir)
    try:
        try:
            server.start()
        except Exception as e:  # binaries there but broken: an error, never a skip
            pytest.fail(f"could not start a PostgreSQL server from {bindir}: {e}", pytrace=False)
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def pg_store(postgres_url: str) -> str:
    """A fresh, empty database on the session's server, as a bare postgresql:// store URL with a password."""
    import psycopg2

    name = f"t_{uuid.uuid4().hex[:12]}"
    with contextlib.closing(psycopg2.connect(postgres_url)) as conn:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    return f"{postgres_url.rsplit('/', 1)[0]}/{name}"
