"""Clients that keep sending while a test hurts the gateway, and the check that
every message they heard 250 for arrived ("250 means durable")."""

from __future__ import annotations

import asyncio
import re
import smtplib
import threading
import time

from tests.conftest import SinkHandle


class Senders:
    """``count`` threads, each sending one message per connection until stopped;
    ``acked`` holds the Message-IDs whose client heard 250."""

    def __init__(self, port: int, count: int, prefix: str, acked: list[str]) -> None:
        self.stop_event = threading.Event()
        self.acked = acked
        self.threads = [
            threading.Thread(target=self._send, args=(port, f"{prefix}-{n}")) for n in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def _send(self, port: int, name: str) -> None:
        counter = 0
        while not self.stop_event.is_set():
            counter += 1
            message_id = f"{name}-{counter}-{time.monotonic_ns()}"
            body = f"Subject: durable\r\nMessage-ID: <{message_id}@test>\r\n\r\nx\r\n".encode()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.sendmail("bob@example.org", ["alice@example.com"], body)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.02)
                continue
            self.acked.append(message_id)  # the client heard 250

    async def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            await asyncio.to_thread(thread.join, 15)


async def arrived(sink: SinkHandle, acked: list[str], timeout: float = 60) -> set[str]:
    """The test Message-IDs at the sink, once all of ``acked`` are there (or the time is up)."""
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    while time.monotonic() < deadline:
        found = {
            m.group(1).decode()
            for _, body in sink.messages()
            if (m := re.search(rb"Message-ID: <([^@>]+)@test>", body))
        }
        if found.issuperset(acked):
            break
        await asyncio.sleep(0.2)
    return found
