"""Crash test: SIGKILL the gateway at random moments while clients send.

Every message whose client heard 250 must arrive at the sink at least once
after restarts ("250 means durable"). Messages whose client saw an error
or a dropped connection may or may not arrive; none may arrive twice as
different messages (ids are unique), and none may be lost once accepted.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import smtplib
import threading
import time
from collections.abc import Callable

from tests.conftest import GatewayProcess, SinkHandle

ROUNDS = 5
SENDERS = 4


def _sender(port: int, stop: threading.Event, acked: list[str], number: int) -> None:
    counter = 0
    while not stop.is_set():
        counter += 1
        message_id = f"crash-{number}-{counter}-{time.monotonic_ns()}"
        body = f"Subject: crash test\r\nMessage-ID: <{message_id}@test>\r\n\r\nx\r\n".encode()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("bob@example.org", ["alice@example.com"], body)
        except (OSError, smtplib.SMTPException):
            time.sleep(0.02)
            continue
        acked.append(message_id)  # the client heard 250


async def test_every_acknowledged_message_survives_sigkill(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    rng = random.Random(1234)
    acked: list[str] = []
    for _ in range(ROUNDS):
        gw = gateway_process(sink.port, spoof_detection=False)
        stop = threading.Event()
        threads = [
            threading.Thread(target=_sender, args=(gw.port, stop, acked, n)) for n in range(SENDERS)
        ]
        for thread in threads:
            thread.start()
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        gw.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(gw.process.wait, 10)
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 15)
    assert len(acked) > 50, "the test must actually send mail"
    gateway_process(sink.port, spoof_detection=False)  # one last restart drains the queue
    deadline = time.monotonic() + 60
    arrived: set[str] = set()
    while time.monotonic() < deadline:
        arrived = {
            m.group(1).decode()
            for _, body in sink.messages()
            if (m := re.search(rb"Message-ID: <([^@>]+)@test>", body))
        }
        if arrived.issuperset(acked):
            break
        await asyncio.sleep(0.2)
    missing = sorted(set(acked) - arrived)
    print(f"crash test: {ROUNDS} SIGKILLs, {len(acked)} acknowledged, {len(arrived)} arrived")
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages were lost"
