"""A clock the tests move by hand, and helpers to run a gateway's queue on it.

Tests about the queue's time (retries, backoff, expiry, delay warnings) give
the queue this clock and move it forward, instead of configuring tiny
intervals and sleeping through them. They then wait for the queue to reach a
state, never for a length of time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from smtpgate.app import Gateway
from smtpgate.queue.store import Filters, QueuedMessage

START = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


class FakeClock:
    """A :class:`smtpgate.queue.clock.Clock` that moves only when told to."""

    def __init__(self, start: float = START) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds


def use_clock(gateway: Gateway, clock: FakeClock, jitter: float = 0.5) -> None:
    """Run a started gateway's queue on ``clock``, before any mail is sent; the
    backoff jitter becomes fixed (0.5: exactly the nominal interval)."""
    queue, manager = gateway.queue, gateway.manager
    queue.clock = queue.store.clock = manager.clock = clock
    manager.jitter = lambda: jitter


def advance(gateway: Gateway, clock: FakeClock, seconds: float) -> None:
    """Move time on and wake the manager: something may be due now."""
    clock.advance(seconds)
    gateway.queue.changed.set()


async def queued(gateway: Gateway) -> list[QueuedMessage]:
    """Every message in the gateway's queue, read on the queue's own thread."""
    store = gateway.queue.store
    return await gateway.queue.call(lambda: list(store.list(Filters())))


async def wait_queue(
    gateway: Gateway, reached: Callable[[list[QueuedMessage]], bool], timeout: float = 15
) -> list[QueuedMessage]:
    """Wait until the queue's messages satisfy ``reached``; returns them."""
    deadline = time.monotonic() + timeout
    while not reached(found := await queued(gateway)):
        assert time.monotonic() < deadline, f"the queue never got there: {found}"
        await asyncio.sleep(0.05)
    return found


def attempts_are(*expected: tuple[str, int]) -> Callable[[list[QueuedMessage]], bool]:
    """``reached`` for :func:`wait_queue`: each recipient's (state, attempts), in order."""

    def reached(messages: list[QueuedMessage]) -> bool:
        return [(r.state, r.attempts) for m in messages for r in m.recipients] == list(expected)

    return reached


def states_are(*expected: str) -> Callable[[list[QueuedMessage]], bool]:
    """``reached`` for :func:`wait_queue`: each recipient's state, in order."""

    def reached(messages: list[QueuedMessage]) -> bool:
        return [r.state for m in messages for r in m.recipients] == list(expected)

    return reached


def empty(messages: list[QueuedMessage]) -> bool:
    """``reached`` for :func:`wait_queue`: nothing left to do, reports included."""
    return not messages
