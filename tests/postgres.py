"""A private PostgreSQL for tests (Debian's ``postgresql`` package, on loopback).

One instance per test session: ``initdb`` in a temporary directory owned by
``nobody`` (PostgreSQL refuses to run as root), listening on 127.0.0.1 on a
free port with its unix socket in that directory. Host connections by the
superuser ``postgres`` are trusted; every other role authenticates with a
password (SCRAM), so tests can use a password file. Each test that asks for
``postgres_url`` gets a database of its own. Missing binaries fail the test
with the package to install (never a silent skip).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

USER = "nobody"  # the unprivileged owner of the instance
PASSWORD_ROLE = "gate"
PASSWORD = "pg-Secret-4711"

HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail(
            "the PostgreSQL tests need initdb and pg_ctl: apt-get install postgresql "
            "(Debian's package; .ci/run installs it)",
            pytrace=False,
        )
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Postgres:
    directory: Path
    port: int
    bin: Path

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        )

    def create_database(self, name: str) -> str:
        with self.admin() as connection:
            connection.execute(f'CREATE DATABASE "{name}" OWNER {PASSWORD_ROLE}')
        return self.url(name)

    def run(self, *command: str) -> None:
        subprocess.run(
            ["runuser", "-u", USER, "--", *command],
            check=True,
            capture_output=True,
            cwd=self.directory,
        )

    def options(self) -> str:
        return (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories={self.directory} -c fsync=off -c max_connections=200"
        )

    def pause(self) -> None:
        """Stop the server (the database goes away under its clients)."""
        data = str(self.directory / "data")
        self.run(str(self.bin / "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start a paused server again, on the same port with the same data."""
        data, log = str(self.directory / "data"), str(self.directory / "log")
        self.run(
            str(self.bin / "pg_ctl"), "-D", data, "-o", self.options(), "-l", log, "-w", "start"
        )

    def start(self) -> None:
        data = self.directory / "data"
        self.run(
            str(self.bin / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        (data / "pg_hba.conf").write_text(HBA)
        options = self.options()
        self.run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(self.directory / "log"),
            "-w",
            "start",
        )
        with self.admin() as connection:
            connection.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'")

    def stop(self) -> None:
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast", "stop")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    bin_dir = binaries()
    directory = Path(tempfile.mkdtemp(prefix="smtpgate-postgres-"))
    owner = pwd.getpwnam(USER)
    os.chown(directory, owner.pw_uid, owner.pw_gid)
    server = Postgres(directory, free_port(), bin_dir)
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = directory / "log"
        detail = log.read_text() if log.exists() else ""
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr!r} {detail}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


_databases = itertools.count(1)


@pytest.fixture
def postgres_url(postgres: Postgres) -> str:
    """A fresh database (owned by the password role) on the session's instance;
    the URL connects as the trusted superuser."""
    return postgres.create_database(f"test_{os.getpid()}_{next(_databases)}")
