"""A throwaway PostgreSQL server for tests, from the system's packages.

``initdb`` makes a cluster in a fresh temporary directory, ``pg_ctl start`` runs it on a
free port of 127.0.0.1 only (its unix socket in that directory, not /var/run), one
database is created, and on exit the server is stopped and the directory removed.

``initdb`` and ``postgres`` refuse to run as root. As root (as the tests run here and
in containers) both run as the ``postgres`` system user the packages create, and the
directory is its own; otherwise as the current user. The directory comes from
``tempfile.mkdtemp`` rather than pytest's ``tmp_path``: those live under a root-only
(0700) ``/tmp/pytest-of-root``, which the ``postgres`` user cannot enter.

``scripts/ensure_postgres.sh`` (run by ``make install``) installs the packages where
they are missing; without them ``unavailable()`` says why and the tests skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Debian/Ubuntu keep the server binaries off PATH, one directory per major version.
PACKAGE_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVICE_USER = "postgres"
SUPERUSER = "pvit"
START_TIMEOUT_S = 60
# Durability off: a test database is thrown away, and fsyncs are slow on a loaded disk.
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def find_binaries() -> tuple[str, str] | None:
    """``(initdb, pg_ctl)`` from PATH, else from the newest packaged version."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for bin_dir in sorted(glob.glob(PACKAGE_BIN_GLOB), key=_major_version, reverse=True):
        initdb, pg_ctl = Path(bin_dir, "initdb"), Path(bin_dir, "pg_ctl")
        if initdb.is_file() and pg_ctl.is_file():
            return str(initdb), str(pg_ctl)
    return None


def _major_version(bin_dir: str) -> int:
    version = Path(bin_dir).parent.name
    return int(version) if version.isdigit() else -1


def unavailable() -> str | None:
    """Why no server can be started here, or None if one can."""
    if find_binaries() is None:
        return (f"PostgreSQL is not installed (no initdb/pg_ctl on PATH or in "
                f"{PACKAGE_BIN_GLOB}); `make install` installs it where apt-get is usable")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return (f"running as root and there is no {SERVICE_USER!r} user to run "
                    f"PostgreSQL as (it refuses root)")
    return None


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    work_dir: Path

    def url(self, driver: str = "postgresql+asyncpg") -> str:
        return (f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}"
                f"/{self.database}")

    def fetch(self, query: str, *args) -> list[tuple]:
        """Rows of ``query`` as tuples (asyncpg: it is installed with Prefect)."""
        return asyncio.run(self._fetch(self.database, query, *args))

    async def _fetch(self, database: str, query: str, *args) -> list[tuple]:
        import asyncpg

        connection = await asyncpg.connect(host=self.host, port=self.port, user=self.user,
                                           password=self.password, database=database,
                                           timeout=30)
        try:
            return [tuple(row) for row in await connection.fetch(query, *args)]
        finally:
            await connection.close()


@contextlib.contextmanager
def running(database: str = "prefect") -> Iterator[PostgresServer]:
    """A running server with an empty ``database``; stopped and removed on exit."""
    binaries = find_binaries()
    if binaries is None:
        raise RuntimeError(unavailable())
    initdb, pg_ctl = binaries
    as_user = _service_user_kwargs()
    work = Path(tempfile.mkdtemp(prefix="pvit-postgres-"))
    data, log = work / "data", work / "postgres.log"
    server = PostgresServer(host="127.0.0.1", port=_free_port(), user=SUPERUSER,
                            password=secrets.token_hex(16), database=database, work_dir=work)
    started = False
    try:
        if as_user:
            os.chown(work, as_user["user"], as_user["group"])
        password_file = work / "password"
        password_file.write_text(server.password + "\n")
        if as_user:
            os.chown(password_file, as_user["user"], as_user["group"])

        def run(args: list[str]) -> None:
            result = subprocess.run(args, cwd=work, capture_output=True, text=True,
                                    timeout=START_TIMEOUT_S + 30, check=False, **as_user)
            if result.returncode != 0:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"{args[0]} exited {result.returncode}:\n{result.stdout}"
                                   f"\n{result.stderr}\n{tail}")

        run([initdb, "--pgdata", str(data), "--username", SUPERUSER,
             "--pwfile", str(password_file), "--auth", "scram-sha-256",
             "--no-locale", "--encoding", "UTF8", "--no-sync"])
        options = (f"-c listen_addresses={server.host} -p {server.port} "
                   f"-c unix_socket_directories={work} {SERVER_OPTIONS}")
        started = True  # from here on a failed start may still have left a postmaster
        run([pg_ctl, "--pgdata", str(data), "--log", str(log), "--wait",
             "--timeout", str(START_TIMEOUT_S), "--options", options, "start"])
        asyncio.run(server._fetch("postgres", f'CREATE DATABASE "{database}"'))
        yield server
    finally:
        if started:
            _stop(pg_ctl, data, work, as_user)
        shutil.rmtree(work, ignore_errors=True)


def _service_user_kwargs() -> dict:
    """``subprocess`` arguments that drop root to the ``postgres`` user (none otherwise)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(SERVICE_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _stop(pg_ctl: str, data: Path, work: Path, as_user: dict) -> None:
    """``pg_ctl stop`` (fast: disconnects clients), then the postmaster's pid if need be."""
    for mode in ("fast", "immediate"):
        result = subprocess.run([pg_ctl, "--pgdata", str(data), "--mode", mode, "--wait",
                                 "--timeout", "30", "stop"], cwd=work, capture_output=True,
                                check=False, timeout=60, **as_user)
        if result.returncode == 0 or not (data / "postmaster.pid").exists():
            return
    # The first line of postmaster.pid is the postmaster's pid; its children exit with it.
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
