"""A private clamd for tests (Debian's ``clamav-daemon``, on loopback).

clamd runs as ``nobody`` (when the tests run as root) in the foreground, with a
configuration of its own in a temporary directory: TCP on 127.0.0.1 and a
free port and a unix socket, a stream limit of 1 MiB, and a signature database written here,
since freshclam cannot download one: an ``.ndb`` body signature matching the
EICAR test string anywhere in a file. ``start`` waits until clamd answers
``PING`` with ``PONG`` (it answers only once its databases are loaded) and
checks that it loaded our signature by scanning EICAR. ``stop`` and
``start`` again on the same port simulate an outage. A missing clamd fails
the test with the package to install.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpgate.content.clamd import instream, ping
from tests.conftest import free_port

USER = "nobody"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "Smtpgate.Test.EICAR"
STREAM_MAX = 1024 * 1024  # clamd's StreamMaxLength here


def clamd_binary() -> str:
    found = shutil.which("clamd") or ("/usr/sbin/clamd" if Path("/usr/sbin/clamd").exists() else "")
    if not found:
        pytest.fail(
            "the virus scanning tests need clamd: apt-get install clamav-daemon "
            "(Debian's package; .ci/run installs it)",
            pytrace=False,
        )
    return found


class Clamd:
    """One private clamd; ``address`` is what ``virus.clamd`` takes."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def unix_address(self) -> str:
        return f"unix:{self.directory / 'clamd.sock'}"

    def write_files(self) -> None:
        database = self.directory / "db"
        database.mkdir()
        (database / "smtpgate-test.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        (self.directory / "clamd.conf").write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"TCPSocket {self.port}",
                    "TCPAddr 127.0.0.1",
                    f"LocalSocket {self.directory / 'clamd.sock'}",
                    "LocalSocketMode 666",
                    f"DatabaseDirectory {database}",
                    f"LogFile {self.directory / 'clamd.log'}",
                    f"PidFile {self.directory / 'clamd.pid'}",
                    f"TemporaryDirectory {self.directory}",
                    f"StreamMaxLength {STREAM_MAX // 1024}K",
                    "Bytecode no",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            owner = pwd.getpwnam(USER)
            for path in (self.directory, database, *database.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def spawn(self) -> subprocess.Popen[bytes]:
        command = [clamd_binary(), "--config-file", str(self.directory / "clamd.conf")]
        if os.geteuid() == 0:
            command = ["runuser", "-u", USER, "--", *command]
        return subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory
        )

    async def start(self, timeout: float = 60) -> None:
        self.process = process = self.spawn()
        deadline = time.monotonic() + timeout
        while not await ping(self.address, timeout=2):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.directory / "clamd.log"
                detail = log.read_text()[-2000:] if log.exists() else ""
                pytest.fail(f"clamd did not start: {detail}", pytrace=False)
            await asyncio.sleep(0.1)
        found = await instream(self.address, iter([b"hello " + EICAR + b"\r\n"]))
        assert found is not None, "clamd did not load the test signature"
        assert found.startswith(SIGNATURE), found

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(name="clamd")
async def clamd_fixture() -> AsyncIterator[Clamd]:
    directory = Path(tempfile.mkdtemp(prefix="smtpgate-clamd-"))
    server = Clamd(directory, free_port())
    server.write_files()
    try:
        await server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
