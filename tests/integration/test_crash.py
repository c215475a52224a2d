"""Crash test: SIGKILL the gateway at random moments while clients send.

Every message whose client heard 250 must arrive at the sink at least once
after restarts ("250 means durable"). Messages whose client saw an error
or a dropped connection may or may not arrive; none may arrive twice as
different messages (ids are unique), and none may be lost once accepted.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable

from tests.conftest import GatewayProcess, SinkHandle
from tests.integration.acked import Senders, arrived

ROUNDS = 5
SENDERS = 4


async def test_every_acknowledged_message_survives_sigkill(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    rng = random.Random(1234)
    acked: list[str] = []
    for round_ in range(ROUNDS):
        gw = gateway_process(sink.port, spoof_detection=False)
        senders = Senders(gw.port, SENDERS, f"crash-{round_}", acked)
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        gw.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(gw.process.wait, 10)
        await senders.stop()
    assert len(acked) > 50, "the test must actually send mail"
    gateway_process(sink.port, spoof_detection=False)  # one last restart drains the queue
    found = await arrived(sink, acked)
    missing = sorted(set(acked) - found)
    print(f"crash test: {ROUNDS} SIGKILLs, {len(acked)} acknowledged, {len(found)} arrived")
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages were lost"
