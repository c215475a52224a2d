"""Helpers of the observability tests: a real ``smtpgate serve`` whose log is
kept in a file (at level info, so the mail log is in it), and plain SMTP."""

from __future__ import annotations

import asyncio
import re
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import SMTPGATE, base_config, free_port, merge, wait_for_port

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    api_port: int
    config: Path
    log: Path
    data_dir: Path

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(tmp_path: Path, sink_port: int, *, json: bool = False, **overrides: Any) -> Served:
    port, api_port = free_port(), free_port()
    while api_port == port:  # two probes may get the same free port
        api_port = free_port()
    data_dir = tmp_path / "gw"
    document = merge(base_config(data_dir, sink_port), overrides)
    document["listeners"][0]["address"] = f"127.0.0.1:{port}"
    admin = document.setdefault("admin", {})
    host = (admin.get("listen") or "127.0.0.1:0").rsplit(":", 1)[0]
    admin["listen"] = f"{host}:{api_port}"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    log = tmp_path / "gateway.log"
    command = [SMTPGATE, "serve", "--config", str(path), "--log-level", "info"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command + (["--log-json"] if json else []), stdout=out, stderr=out
        )
    served = Served(process, port, api_port, path, log, data_dir)
    try:
        wait_for_port(port, timeout=30, alive=lambda: process.poll() is None)
        wait_for_port(api_port, timeout=30, alive=lambda: process.poll() is None)
    except TimeoutError:
        served.stop()
        raise TimeoutError(f"serve did not start: {log.read_text()[-2000:]}") from None
    return served


def send(
    port: int, sender: str, recipients: list[str], message_id: str, subject: str = "hello"
) -> dict[str, tuple[int, bytes]]:
    """One message over SMTP; the refused recipients (smtplib's answer)."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, recipients[0], subject
    message["Message-ID"] = message_id
    message.set_content("a test message\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.send_message(message, sender, recipients)


async def wait_until(found: Any, timeout: float = 20, step: float = 0.1) -> Any:
    """Poll ``found()`` until it is true (the sink runs on this event loop: never block it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


def documented_formats() -> dict[str, re.Pattern[str]]:
    """The mail log's formats as docs/operations.md states them."""
    text = DOCS.read_text()
    block = text.split("<!-- maillog-formats -->", 1)[1].split("```", 2)[1]
    formats = {}
    for line in block.strip().splitlines():
        name, _, pattern = line.partition(": ")
        formats[name] = re.compile(pattern)
    return formats


def mail_lines(lines: list[str]) -> Iterator[str]:
    """The mail log lines of a plain-text log, without their time stamp."""
    prefix = documented_formats()["prefix"]
    for line in lines:
        matched = prefix.match(line)
        if matched and not matched["line"].startswith("["):  # structlog's "[info  ] ..."
            yield matched["line"]
