"""The queue survives what goes wrong around it: an attempt that raises is a
counted, backed-off deferral, and processes opening a new queue together all
open it (and the other shared databases).

An exception inside a queue run must never turn into a busy loop (the message
staying due, retried at once, forever) nor into a silent loss."""

from __future__ import annotations

import asyncio
import multiprocessing
import smtplib
from pathlib import Path

import pytest

from smtpgate.delivery.attempt import AttemptReport, Job
from smtpgate.delivery.tlsrpt import SessionRecorder
from smtpgate.observe.tracking import TrackingWriter
from smtpgate.queue.store import Filters, QueueStore
from tests.clock import FakeClock, advance, attempts_are, use_clock, wait_queue
from tests.conftest import GatewayFactory, SinkHandle


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("bob@example.org", ["alice@example.com"], b"Subject: t\r\n\r\nx\r\n")


async def test_an_attempt_that_raises_is_deferred_and_backed_off(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    gw = await gateway_factory(
        spoof_detection=False, queue={"retry": {"first": 60, "max_backoff": 600}}
    )
    clock = FakeClock()
    use_clock(gw.gateway, clock)  # time stands still unless the test moves it
    calls = 0

    async def explode(job: Job) -> AttemptReport:
        nonlocal calls
        calls += 1
        raise RuntimeError("injected failure")

    gw.gateway.manager.deliverer.attempt = explode  # type: ignore[method-assign]
    await asyncio.to_thread(_send, gw.port)
    [message] = await wait_queue(gw.gateway, attempts_are(("deferred", 1)))
    [r] = message.recipients
    assert r.last_reply is not None
    assert r.last_reply.startswith("4.3.0 ")
    assert "internal error" in r.last_reply
    assert r.next_attempt == clock.now() + 60  # backed off, not due again at once
    assert calls == 1

    advance(gw.gateway, clock, 59)
    store = gw.gateway.queue.store
    assert await gw.gateway.queue.call(lambda: store.due(clock.now(), set())) == []
    advance(gw.gateway, clock, 1)  # the retry comes, counted and backed off further
    [message] = await wait_queue(gw.gateway, attempts_are(("deferred", 2)))
    assert message.recipients[0].next_attempt == clock.now() + 120
    assert calls == 2

    store = QueueStore(tmp_path / "gw0" / "queue")  # and it is all in the database
    try:
        [message] = list(store.list(Filters()))
    finally:
        store.close()
    assert [(r.state, r.attempts) for r in message.recipients] == [("deferred", 2)]
    assert sink.messages() == []


def _open(kind: str, directory: str) -> str:
    """What one of the gateway's processes does first with each shared database."""
    path = Path(directory)
    try:
        if kind == "queue":
            QueueStore(path).close()
        elif kind == "tracking":
            TrackingWriter(path, lambda: 1.0)
        else:
            recorder = SessionRecorder(path / "tlsrpt.db")
            recorder.domains("2026-11-29")
            recorder.close()
    except Exception as exc:  # the answer the parent asserts on
        return repr(exc)
    return "opened"


@pytest.mark.parametrize("kind", ["queue", "tracking", "tlsrpt"])
def test_processes_opening_a_new_database_at_once_all_open_it(kind: str, tmp_path: Path) -> None:
    """The workers of a first start, the API and the queue tools may open a
    database that does not exist yet at the same moment. Making it WAL takes a
    lock SQLite does not wait for; none of them may fail with "database is
    locked" (a worker that fails so stops the whole gateway's start)."""
    context = multiprocessing.get_context("fork")
    with context.Pool(6) as pool:
        for round in range(25):
            directory = tmp_path / f"d{round}"
            directory.mkdir()
            answers = pool.starmap(_open, [(kind, str(directory))] * 6)
            assert answers == ["opened"] * 6
