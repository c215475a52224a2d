"""A private rspamd for tests (Debian's ``rspamd`` package, on loopback).

Debian's configuration in /etc/rspamd, started with our own top-level file
and ``--var`` overrides: local.d, the database and run directories and the
log in a temporary directory owned by ``nobody``; one ``normal`` worker on
127.0.0.1 on a free port (no controller, proxy or fuzzy workers); no redis.
Offline and quick: modules that ask the network (DNS lists, SPF, DKIM, DMARC,
fuzzy, maps) are off, rspamd's own DNS points at a closed loopback port, and
the URL suffix list is a few lines (Debian's full list takes ten seconds to
compile at every start). The local rules stay: GTUBE gives *reject*.
A missing rspamd fails the test with the package to install.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

USER, GROUP = "nobody", "nogroup"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
OFF = [  # modules that would ask the network (or redis)
    *("rbl", "fuzzy_check", "multimap", "asn", "phishing", "greylist", "neural", "hfilter"),
    *("spf", "dkim", "dmarc", "once_received", "arc", "mx_check", "url_redirector"),
    *("replies", "ratelimit", "history_redis"),
]

TOP = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    .include "$CONFDIR/worker-normal.inc"
    count = {workers};
}}
"""
OPTIONS = """\
url_tld = "$LOCAL_CONFDIR/tld.dat";
dns { nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 1; }
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Rspamd:
    directory: Path
    port: int
    workers: int = 1
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        local = self.directory / "local.d"
        local.mkdir(exist_ok=True)
        (local / "options.inc").write_text(OPTIONS)
        for module in OFF:
            (local / f"{module}.conf").write_text("enabled = false;\n")
        (self.directory / "tld.dat").write_text("com\norg\nnet\nexample\ntest\n")
        config = self.directory / "rspamd.conf"
        config.write_text(TOP.format(port=self.port, workers=self.workers))
        if os.geteuid() == 0:
            owner = pwd.getpwnam(USER)
            for path in [self.directory, *self.directory.rglob("*")]:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        return config

    def start(self, timeout: float = 30) -> None:
        """Start (again, on the same port) and wait until ``/ping`` answers."""
        config = self.directory / "rspamd.conf"
        user = ["-u", USER, "-g", GROUP] if os.geteuid() == 0 else []
        where = [f"--var={v}={self.directory}" for v in ("LOCAL_CONFDIR", "DBDIR", "RUNDIR")]
        self.process = subprocess.Popen(
            ["rspamd", "-f", *user, "-c", str(config), *where, f"--var=LOGDIR={self.directory}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rspamd exited: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/ping", timeout=1).text.strip() == "pong":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"rspamd did not answer /ping: {self.log_tail()}")

    def stop(self) -> None:
        """Stop it (the port closes: clients see it unreachable)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        log = self.directory / "rspamd.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return text[-3000:]


def require_rspamd() -> None:
    if shutil.which("rspamd") is None:
        pytest.fail(
            "the rspamd tests need rspamd: apt-get install rspamd (Debian's package; "
            ".ci/run installs it)",
            pytrace=False,
        )


def start_rspamd(workers: int = 1) -> Rspamd:
    """A private rspamd in a new temporary directory (the caller stops it)."""
    require_rspamd()
    directory = Path(tempfile.mkdtemp(prefix="smtpgate-rspamd-"))
    server = Rspamd(directory, free_port(), workers)
    server.write_config()
    server.start()
    return server


@pytest.fixture(scope="module", name="rspamd")
def rspamd_fixture() -> Iterator[Rspamd]:
    try:
        server = start_rspamd()
    except RuntimeError as exc:
        pytest.fail(f"rspamd did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)
