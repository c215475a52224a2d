"""The queue survives what goes wrong around it: an attempt that raises is a
counted, backed-off deferral, and processes opening a new queue together all
open it (and the other shared databases).

An exception inside a queue run must never turn into a busy loop (the message
staying due, retried at once, forever) nor into a silent loss."""

from __future__ import annotations

import asyncio
import multiprocessing
import smtplib
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from smtpgate.delivery.attempt import AttemptReport, Job
from smtpgate.delivery.tlsrpt import SessionRecorder
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.observe.tracking import TrackingWriter
from smtpgate.queue.states import RecipientState
from smtpgate.queue.store import Filters, NewMessage, QueueStore, RecipientUpdate
from smtpgate.spool import SpooledBody, new_queue_id
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


async def test_new_messages_are_attempted_once_while_scans_run_beside_them(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    """A new message goes straight to delivery with its body, while the
    manager's scans look for due messages in the store at the same time (here
    forced every half millisecond): each message still reaches the next hop
    exactly once."""
    gw = await gateway_factory(spoof_detection=False)
    queue = gw.gateway.queue
    stop = asyncio.Event()

    async def scans() -> None:
        while not stop.is_set():
            queue.changed.set()
            await asyncio.sleep(0.0005)

    def send_some(first: int) -> None:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            for n in range(first, first + 10):
                message = f"Subject: m{n}\r\nMessage-ID: <m{n}@example.org>\r\n\r\nx\r\n"
                client.sendmail("bob@example.org", ["alice@example.com"], message.encode())

    scanning = asyncio.create_task(scans())
    loop = asyncio.get_running_loop()
    try:  # the clients' own threads: the gateway's checks use the default executor
        with ThreadPoolExecutor(6) as clients:
            sent = (loop.run_in_executor(clients, send_some, first) for first in range(0, 60, 10))
            await asyncio.gather(*sent)
        arrived = await sink.wait_for(60)
        await asyncio.sleep(1.0)  # a second attempt of any of them would arrive meanwhile
    finally:
        stop.set()
        await scanning
    subjects = sorted(
        body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for _, body in sink.messages()
    )
    assert len(arrived) >= 60
    assert subjects == sorted(f"m{n}".encode() for n in range(60))


def _new(
    store: QueueStore, subject: bytes, recipients: int = 1, threshold: int = 1 << 20
) -> NewMessage:
    """A message from bob to ``recipients`` addresses (r0@, r1@ ... example.net),
    its body in memory, or in a spool file beyond ``threshold`` octets."""
    body = SpooledBody(store.bodies, new_queue_id(), threshold=threshold)
    body.write(b"Subject: " + subject + b"\r\n\r\nhello\r\n")
    body.finish()
    rcpts = tuple(Recipient(f"r{i}@example.net") for i in range(recipients))
    return NewMessage(Envelope("bob@example.org", rcpts), body)


def test_what_is_being_attempted_neither_counts_as_due_nor_sets_the_next_scan(
    tmp_path: Path,
) -> None:
    """While a message is being attempted, the scans neither return it nor wake
    for it: its next attempt time is "now" until the outcome is recorded, and a
    scan that counted it would run again every few milliseconds for as long as
    the attempt lasts. What ingest returns is the message as a scan reads it."""
    store = QueueStore(tmp_path / "queue")
    try:
        fresh = [store.ingest([_new(store, text)])[0] for text in (b"one", b"two")]
        one, two = (item.message for item in fresh)
        assert store.get(one.id) == one
        assert store.body(one.id) == fresh[0].body == b"Subject: one\r\n\r\nhello\r\n"
        now = one.arrival + 1
        assert sorted(m.id for m in store.due(now, set())) == sorted([one.id, two.id])
        assert [m.id for m in store.due(now, {one.id})] == [two.id]
        assert store.next_due({one.id}) == two.arrival
        assert store.next_due({one.id, two.id}) is None
        assert store.next_due() == one.arrival
    finally:
        store.close()


def test_one_write_stores_new_messages_and_removes_exactly_the_finished_ones(
    tmp_path: Path,
) -> None:
    """The group commit's transaction: new messages go in and outcomes are
    recorded together; a message goes (with its body file) only when none of
    its recipients is left to try, and one still pending keeps its row."""
    store = QueueStore(tmp_path / "queue")
    try:
        done, half = _new(store, b"done", 2), _new(store, b"half", 2)
        filed = _new(store, b"filed", 1, threshold=10)
        first = store.write([done, half, filed], ()).fresh
        file = first[2].body
        assert isinstance(file, Path)
        assert file.exists()
        ids = [f.message.id for f in first]
        late = _new(store, b"late")

        def outcome(message_id: str, idx: int, state: RecipientState) -> RecipientUpdate:
            return RecipientUpdate(message_id, idx, state, "250 ok", first[0].message.arrival)

        written = store.write(
            [late],
            [
                outcome(ids[0], 0, RecipientState.DELIVERED),
                outcome(ids[0], 1, RecipientState.BOUNCED),
                outcome(ids[1], 0, RecipientState.DELIVERED),
                outcome(ids[1], 1, RecipientState.DEFERRED),
                outcome(ids[2], 0, RecipientState.DELIVERED),
            ],
        )
        assert written.refused is None
        assert store.get(ids[0]) is None
        assert store.get(ids[2]) is None
        assert not file.exists()
        kept = store.get(ids[1])
        assert kept is not None
        assert [r.state for r in kept.recipients] == [
            RecipientState.DELIVERED,
            RecipientState.DEFERRED,
        ]
        assert store.get(written.fresh[0].message.id) == written.fresh[0].message
        assert store.apply([outcome(ids[1], 1, RecipientState.DELIVERED)]) == [ids[1]]
        assert store.get(ids[1]) is None
    finally:
        store.close()


def test_outcomes_for_many_recipients_and_one_twice_are_recorded_in_order(
    tmp_path: Path,
) -> None:
    """Outcomes go to the store many per statement: each of 120 recipients gets
    its own state, reply and count; a recipient with two outcomes in one write
    ends with the later one and both attempts counted."""
    store = QueueStore(tmp_path / "queue")
    try:
        [fresh] = store.ingest([_new(store, b"many", 120)])
        qid, at = fresh.message.id, fresh.message.arrival

        def state(i: int) -> RecipientState:
            return RecipientState.DELIVERED if i % 3 else RecipientState.DEFERRED

        store.apply([RecipientUpdate(qid, i, state(i), f"reply {i}", at + i) for i in range(120)])
        kept = store.get(qid)
        assert kept is not None
        assert [(r.state, r.last_reply, r.attempts) for r in kept.recipients] == [
            (state(i), f"reply {i}", 1) for i in range(120)
        ]
        assert [r.next_attempt for r in kept.recipients] == [at + i for i in range(120)]
        twice = [
            RecipientUpdate(qid, 0, RecipientState.DEFERRED, "451 first", at + 5),
            RecipientUpdate(qid, 0, RecipientState.DEFERRED, "452 second", at + 9),
        ]
        store.apply(twice)
        again = store.get(qid)
        assert again is not None
        first = again.recipients[0]
        assert (first.last_reply, first.next_attempt, first.attempts) == ("452 second", at + 9, 3)
    finally:
        store.close()


def test_a_write_waits_for_another_process_commit_and_reads_go_on_meanwhile(
    tmp_path: Path,
) -> None:
    """The store's connection has no busy timeout of its own: a transaction
    tries again while another process holds the write lock (a worker's commit)
    and goes on once it lets go, instead of failing with "database is
    locked"; reads are not held up meanwhile (WAL)."""
    store = QueueStore(tmp_path / "queue")
    other = sqlite3.connect(
        tmp_path / "queue" / "queue.db", isolation_level=None, check_same_thread=False
    )
    try:
        [fresh] = store.ingest([_new(store, b"held")])
        other.execute("begin immediate")
        other.execute("update messages set size = size")
        assert store.get(fresh.message.id) == fresh.message  # at once, lock or not
        release = threading.Timer(0.3, lambda: other.execute("commit"))
        release.start()
        started = time.monotonic()
        update = RecipientUpdate(fresh.message.id, 0, RecipientState.DELIVERED, "250 ok", 0.0)
        assert store.apply([update]) == [fresh.message.id]
        assert time.monotonic() - started >= 0.2  # it did wait for the lock
        release.join()
    finally:
        other.close()
        store.close()
