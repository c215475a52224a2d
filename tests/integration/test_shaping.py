"""Per-destination shaping with real SMTP servers that are slow or crowded.

The gateway relays a burst of separate messages to one destination (a
smarthost on loopback, tests/slowsink.py); the server records how many
connections it had at once, how many it refused with 421, how many
transactions each connection carried and when each message arrived.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from smtpgate.delivery.attempt import AttemptReport, Outcome
from smtpgate.queue.shaping import too_many_connections
from tests.clock import empty, wait_queue
from tests.conftest import GatewayFactory
from tests.slowsink import SlowSink

NO_SPOOF = {"spoof_detection": False}


@pytest.fixture
async def slow() -> AsyncIterator[SlowSink]:
    server = SlowSink()
    await server.start()
    yield server
    await server.stop()


def burst(port: int, count: int) -> None:
    """``count`` separate messages to one destination, over one SMTP session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for n in range(count):
            client.sendmail(
                "bob@example.org", ["alice@example.com"], f"Subject: m{n}\r\n\r\nbody\r\n".encode()
            )


def to(server: SlowSink, **queue: Any) -> dict[str, Any]:
    return {
        **NO_SPOOF,
        "queue": {"connection_cache_time": 5, **queue},
        "send_connectors": [
            {
                "name": "slow",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": server.port}},
            }
        ],
    }


async def arrived(server: SlowSink, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(server.subjects) < count:
        assert time.monotonic() < deadline, f"{len(server.subjects)} of {count} arrived"
        await asyncio.sleep(0.05)


async def test_a_concurrency_rule_caps_connections_to_a_destination(
    gateway_factory: GatewayFactory, slow: SlowSink
) -> None:
    slow.data_delay = 0.3
    rule = {"connector": "slow", "destination": "127.0.0.1:*", "concurrency": 3}
    gw = await gateway_factory(**to(slow, shaping=[rule]))
    await asyncio.to_thread(burst, gw.port, 12)
    await arrived(slow, 12)
    assert slow.most_open == 3  # the limit, reached and never passed
    assert sorted(slow.subjects) == sorted(f"m{n}" for n in range(12))


async def test_without_a_rule_the_postfix_default_of_20_applies(
    gateway_factory: GatewayFactory, slow: SlowSink
) -> None:
    slow.data_delay = 0.5
    gw = await gateway_factory(**to(slow))
    await asyncio.to_thread(burst, gw.port, 30)
    await arrived(slow, 30)
    assert slow.most_open == 20
    shaper = gw.gateway.manager.shaper
    assert shaper.concurrency("slow", f"127.0.0.1:{slow.port}") == 20


async def test_a_421_too_many_connections_lowers_concurrency_and_all_mail_arrives_once(
    gateway_factory: GatewayFactory, slow: SlowSink
) -> None:
    slow.data_delay, slow.max_connections = 0.3, 3
    gw = await gateway_factory(**to(slow, shaping_feedback_hold=60))
    await asyncio.to_thread(burst, gw.port, 16)
    await arrived(slow, 16)
    await wait_queue(gw.gateway, empty)
    shaper = gw.gateway.manager.shaper
    assert shaper.concurrency("slow", f"127.0.0.1:{slow.port}") <= 3  # held for a minute
    assert slow.refused >= 1  # the signal came
    assert sorted(slow.subjects) == sorted(f"m{n}" for n in range(16))  # once each


async def test_concurrency_recovers_after_the_hold(
    gateway_factory: GatewayFactory, slow: SlowSink
) -> None:
    slow.data_delay, slow.max_connections = 0.2, 2
    gw = await gateway_factory(**to(slow, shaping_feedback_hold=0.5))
    await asyncio.to_thread(burst, gw.port, 8)
    await arrived(slow, 8)
    shaper, pair = gw.gateway.manager.shaper, ("slow", f"127.0.0.1:{slow.port}")
    lowered = shaper.concurrency(*pair)
    assert lowered < 20
    slow.max_connections = None  # the destination relaxes
    await asyncio.sleep(0.6)  # the hold ends
    await asyncio.to_thread(burst, gw.port, 6)
    await arrived(slow, 14)
    assert shaper.concurrency(*pair) > lowered  # one step per attempt that got through


async def test_messages_per_connection_closes_after_the_limit(
    gateway_factory: GatewayFactory, slow: SlowSink
) -> None:
    rule = {"destination": "127.0.0.1:*", "concurrency": 1, "messages_per_connection": 2}
    gw = await gateway_factory(**to(slow, shaping=[rule]))
    await asyncio.to_thread(burst, gw.port, 6)
    await arrived(slow, 6)
    await wait_queue(gw.gateway, empty)
    await asyncio.sleep(0.2)  # the last connection closes
    assert max(slow.per_connection) == 2
    assert sum(slow.per_connection) == 6
    assert len([n for n in slow.per_connection if n]) >= 3


async def test_a_rate_spaces_the_attempts(gateway_factory: GatewayFactory, slow: SlowSink) -> None:
    rule = {"destination": "127.0.0.1:*", "rate_per_minute": 300}  # one per 0.2 s
    gw = await gateway_factory(**to(slow, shaping=[rule]))
    await asyncio.to_thread(burst, gw.port, 5)
    await arrived(slow, 5)
    gaps = [b - a for a, b in zip(slow.arrivals, slow.arrivals[1:], strict=False)]
    assert min(gaps) > 0.15, gaps


def test_what_counts_as_too_many_connections() -> None:
    def report(code: int | None, text: str) -> AttemptReport:
        return AttemptReport([Outcome(0, code, text)], reached=code is not None)

    assert too_many_connections(report(421, "421 4.7.0 Try again later"))
    assert too_many_connections(
        report(None, "4.4.1 unreachable: mx did not greet with 220 (421 Too many connections)")
    )
    assert too_many_connections(report(450, "450 4.7.1 too many concurrent SMTP sessions"))
    assert not too_many_connections(report(451, "451 4.3.0 mailbox busy"))
    assert not too_many_connections(report(None, "4.4.1 unreachable: connection refused"))


def test_worker_processes_each_take_their_share_of_a_pairs_limits() -> None:
    from smtpgate.config.schema import QueueSettings  # noqa: PLC0415
    from smtpgate.queue.shaping import Shaper  # noqa: PLC0415

    rule = {"connector": "c", "destination": "d", "concurrency": 5, "rate_per_minute": 30}
    settings = QueueSettings.model_validate({"shaping": [rule]})
    alone, one_of_two = Shaper(lambda: settings), Shaper(lambda: settings, share=2)
    assert (alone.limits("c", "d").concurrency, alone.limits("c", "d").rate_per_minute) == (5, 30)
    assert one_of_two.limits("c", "d").concurrency == 2  # 2 + 2 <= 5
    assert one_of_two.limits("c", "d").rate_per_minute == 15
    assert Shaper(lambda: settings, share=8).limits("c", "d").concurrency == 1  # never 0
