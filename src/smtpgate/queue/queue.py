"""The queue as the event loop sees it: group commit and calls into the store.

Every store call runs on one worker thread that owns the SQLite connection,
so the event loop never blocks on disk. :meth:`Queue.ingest` is how the
gateway puts a message into the queue (sessions, reports): calls that arrive
while a commit is running are collected and handed together to
:meth:`QueueStore.write`, so concurrent sessions share one transaction and
one fsync; the outcomes the manager records meanwhile (:meth:`Queue.apply`)
go into the same transaction, so a session's 250 never waits for an
outcome's fsync ahead of its own. (The queue tools, synchronous and in
another process, call :meth:`QueueStore.ingest` with their one message.)

A message just made durable goes straight to delivery (:attr:`Queue.hand_off`,
set while the manager runs) with its body still in memory, instead of waiting
for the manager's next scan to read it back from the store: two trips to the
queue's thread less per message. Its id is in :attr:`Queue.handing` from
before its commit is submitted until the hand-off, so no scan can pick it up
in between and attempt it twice.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from smtpgate.model.envelope import Envelope
from smtpgate.observe.log import get_logger
from smtpgate.queue.clock import SYSTEM_CLOCK, Clock
from smtpgate.queue.states import MessageKind
from smtpgate.queue.store import (
    ONE,
    Fresh,
    NewMessage,
    Owner,
    QueueStore,
    RecipientUpdate,
    clean_orphan_bodies,
)
from smtpgate.spool import SpooledBody

T = TypeVar("T")
log = get_logger("smtpgate.queue")


class Queue:
    def __init__(self, directory: Path, clock: Clock = SYSTEM_CLOCK, owner: Owner = ONE) -> None:
        self.directory = directory
        self.clock = clock  # the store's; the manager takes the same one
        self.owner = owner  # which worker's messages this process queues and delivers
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="queue")
        self._store: QueueStore | None = None
        self._writes = _Writes(self, self._handed)
        self.changed = asyncio.Event()  # something for the manager's scan
        self.hand_off: Callable[[Fresh], None] | None = None  # delivery takes new messages
        self.handing: set[str] = set()  # committing, not handed off yet: no scan takes them

    async def open(self) -> int:
        """Open the store; returns how many orphaned body files were removed."""

        def opening() -> int:
            self._store = QueueStore(self.directory, self.clock, self.owner)
            return clean_orphan_bodies(self._store)

        return await self.call(opening)

    async def close(self) -> None:
        if self._store is not None:
            await self.call(self.store.close)
        self._executor.shutdown(wait=True)

    @property
    def store(self) -> QueueStore:
        assert self._store is not None, "the queue is not open"
        return self._store

    async def call(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def ingest(
        self, envelope: Envelope, body: SpooledBody, kind: MessageKind = MessageKind.MAIL
    ) -> str:
        """Make a message durable; returns its queue id. Raises OSError or QueueError."""
        queue_id = body.queue_id
        self.handing.add(queue_id)
        try:
            await self._writes.ingest([NewMessage(envelope, body, kind)])
        finally:
            self.handing.discard(queue_id)
        return queue_id

    def _handed(self, fresh: list[Fresh]) -> None:
        """After a commit, on the event loop: the new messages to delivery, or a
        scan to find them if the manager does not run."""
        if self.hand_off is None:
            self.changed.set()
            return
        for item in fresh:
            self.hand_off(item)  # its id leaves `handing` when its submitter resumes

    async def apply(self, updates: list[RecipientUpdate]) -> None:
        """Record outcomes; concurrent calls share one transaction (one fsync),
        with the new messages of the moment too."""
        await self._writes.apply(updates)


class _Writes:
    """Group commit: the new messages and the outcomes submitted while a write
    runs go together into the next one, one transaction and one fsync for
    both (:meth:`QueueStore.write`). Each submitter learns the result of the
    write that carried its items; new messages go to ``after`` (on the event
    loop) before their submitters hear of it."""

    def __init__(self, queue: Queue, after: Callable[[list[Fresh]], None]) -> None:
        self._queue = queue
        self._after = after
        self._ingests: list[tuple[list[NewMessage], asyncio.Future[None]]] = []
        self._updates: list[tuple[list[RecipientUpdate], asyncio.Future[None]]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def ingest(self, items: list[NewMessage]) -> None:
        future = self._queued()
        self._ingests.append((items, future))
        await future

    async def apply(self, items: list[RecipientUpdate]) -> None:
        future = self._queued()
        self._updates.append((items, future))
        await future

    def _queued(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._run())
        return loop.create_future()

    async def _run(self) -> None:
        try:
            while self._ingests or self._updates:
                ingests, self._ingests = self._ingests, []
                updates, self._updates = self._updates, []
                new = [item for group, _ in ingests for item in group]
                outcomes = [item for group, _ in updates for item in group]
                store = self._queue.store
                try:
                    written = await self._queue.call(functools.partial(store.write, new, outcomes))
                except Exception as exc:  # every submitter must hear of it
                    _settle(ingests + updates, exc)
                    continue
                _settle(updates, None)
                if written.refused is not None:
                    _settle(ingests, written.refused)
                    continue
                try:
                    self._after(written.fresh)
                except Exception as exc:  # committed: the scan will find them
                    log.error("hand-off after commit failed", error=repr(exc))
                    self._queue.changed.set()
                _settle(ingests, None)
        finally:
            self._running = False


def _settle(waiting: list[tuple[list[Any], asyncio.Future[None]]], error: Exception | None) -> None:
    for _, future in waiting:
        if future.done():  # its submitter was cancelled meanwhile
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
