"""The console in a real browser: one ``smtpgate serve`` (HTTPS admin listener)
with a recording sink, console users, and Debian's chromium driven by
Playwright's sync API.

``playwright install`` cannot download browsers here, so the tests launch the
system's ``/usr/bin/chromium`` (Debian package ``chromium``; ``.ci/run``
installs it) with ``--no-sandbox`` (the tests run as root).

Screenshots go to a temporary directory, and also to ``$SMTPGATE_SCREENSHOTS``
when it is set (``docs/console/*.png`` were made that way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from playwright.sync_api import Error as PlaywrightError

from tests.conftest import SMTPGATE, Certs, base_config, free_port, merge, wait_for_port

CHROMIUM = "/usr/bin/chromium"
FAST = ["--no-fsync"]
VIEWPORT = {"width": 1280, "height": 800}
PASSWORDS = {"alice": "correct horse battery", "oscar": "auditor staple battery"}
ROLES = {"alice": "admin", "oscar": "auditor"}
PARTNER_IP = "127.0.0.7"  # the client the browser test gives a connection profile
ELSEWHERE = "someone@partner.test"  # not hosted: delivered only when relaying is allowed
DEFERRED = "stuck@deferred.test"  # hosted, routed to a port where nothing listens
SMARTHOST_USER = ("gw@postfix.test", "smarthost-secret")  # the "isp" connector's AUTH


def chromium() -> str:
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    assert path, "chromium is required (apt-get install chromium); .ci/run installs it"
    return path


@dataclass
class Served:
    """A running gateway with its console, and its sink."""

    url: str
    smtp_port: int
    config_path: Path
    sink_dir: Path
    sink_port: int
    postfix_port: int  # the "isp" connector's smarthost: a Postfix with AUTH (not started)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def messages(self) -> list[dict[str, Any]]:
        """The envelopes the sink stored, oldest first."""
        metas = sorted(self.sink_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        return [json.loads(m.read_text()) for m in metas]

    def wait_for_message(self, recipient: str, timeout: float = 15) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for envelope in self.messages():
                if recipient in json.dumps(envelope):
                    return envelope
            time.sleep(0.1)
        return None

    def send(self, recipient: str, source: str = "127.0.0.1") -> dict[str, tuple[int, bytes]]:
        """One message from ``source`` (a loopback address); the refused recipients."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, source_address=(source, 0)) as client:
            message_id = f"<{time.time_ns()}@partner.test>"
            body = f"Subject: console test\r\nMessage-ID: {message_id}\r\n\r\nhi\r\n"
            return client.sendmail("sender@partner.test", [recipient], body)

    def cli(self, *argv: str, stdin: str = "") -> str:
        done = subprocess.run(
            [SMTPGATE, *argv, "--config", str(self.config_path)],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def serve_console(directory: Path, certs: Certs) -> Iterator[Served]:
    """Start the sink and ``smtpgate serve`` with the console on HTTPS; yield; stop."""
    sink_port, smtp_port, admin_port = free_port(), free_port(), free_port()
    postfix_port, nowhere_port = free_port(), free_port()
    sink_dir = directory / "sink"
    sink_dir.mkdir(parents=True)
    password = directory / "smarthost-password"
    password.write_text(SMARTHOST_USER[1])
    password.chmod(0o600)
    document = merge(
        base_config(directory / "data", sink_port),
        {
            "admin": {"listen": f"127.0.0.1:{admin_port}", "certificate": "console"},
            "certificates": [
                {"name": "console", "cert": str(certs.cert_file), "key": str(certs.key_file)}
            ],
            "hosted_domains": ["example.com", "example.org", "deferred.test"],
            "send_connectors": [
                {
                    "name": "to-sink",
                    "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink_port}},
                    "security": "none",
                    "namespaces": [{"sender": "*", "recipient": "*"}],
                },
                {
                    "name": "isp",
                    "security": "require-starttls",
                    "deliver": {
                        "smarthost": {
                            "host": "127.0.0.1",
                            "port": postfix_port,
                            "username": SMARTHOST_USER[0],
                            "password_file": str(password),
                        }
                    },
                    "namespaces": [{"sender": "*", "recipient": "isp.invalid"}],
                },
                {
                    "name": "nowhere",
                    "deliver": {"smarthost": {"host": "127.0.0.1", "port": nowhere_port}},
                    "security": "none",
                    "namespaces": [{"sender": "*", "recipient": "deferred.test"}],
                },
            ],
        },
    )
    document["listeners"][0]["address"] = f"127.0.0.1:{smtp_port}"
    config_path = directory / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(document))
    served = Served(
        f"https://127.0.0.1:{admin_port}", smtp_port, config_path, sink_dir, sink_port, postfix_port
    )
    sink = subprocess.Popen(
        [SMTPGATE, "sink", "--listen", f"127.0.0.1:{sink_port}", "--dir", str(sink_dir), *FAST],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    served.processes.append(sink)
    try:
        wait_for_port(sink_port, alive=lambda: sink.poll() is None)
        for name, secret in PASSWORDS.items():
            role = ROLES[name]
            served.cli(
                "admin", "user", "create", name, "--role", role, "--password-stdin", stdin=secret
            )
        gateway = subprocess.Popen(
            [SMTPGATE, "serve", "--config", str(config_path), "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        served.processes.append(gateway)
        wait_for_port(smtp_port, timeout=30, alive=lambda: gateway.poll() is None)
        _wait_https(served.url, gateway)
        yield served
    finally:
        served.stop()


def _wait_https(url: str, gateway: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            error = gateway.stderr.read().decode() if gateway.stderr else ""
            raise RuntimeError(f"smtpgate serve stopped: {error[-2000:]}")
        try:
            if httpx.get(url + "/login", verify=False, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the console does not answer on {url}")


class Screenshots:
    """Where the pages' pictures go: a test artifact directory, and the
    directory ``$SMTPGATE_SCREENSHOTS`` names, if any."""

    def __init__(self, directory: Path) -> None:
        self.directories = [directory]
        extra = os.environ.get("SMTPGATE_SCREENSHOTS")
        if extra:
            self.directories.append(Path(extra))
        for where in self.directories:
            where.mkdir(parents=True, exist_ok=True)

    def take(self, page: Any, name: str) -> Path:
        page.wait_for_load_state("load")
        for attempt in range(3):  # chromium may refuse while it paints a fresh page
            try:
                data: bytes = page.screenshot(full_page=False, type="png")
                break
            except PlaywrightError:
                if attempt == 2:
                    raise
                time.sleep(0.2)
        for where in self.directories:
            (where / f"{name}.png").write_bytes(data)
        return self.directories[0] / f"{name}.png"


def slug(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "dashboard"
