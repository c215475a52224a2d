"""The queue as the event loop sees it: group commit and calls into the store.

Every store call runs on one worker thread that owns the SQLite connection,
so the event loop never blocks on disk. :meth:`Queue.ingest` is how the
gateway puts a message into the queue (sessions, reports): calls that arrive
while a commit is running are collected and handed together to
:meth:`QueueStore.ingest`, the store's one way in, so concurrent sessions
share one transaction and one fsync. (The queue tools, synchronous and in
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
from typing import Any, Generic, TypeVar

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
        self._ingests: _GroupCommit[NewMessage] = _GroupCommit(self, self._commit, self._handed)
        self._outcomes: _GroupCommit[RecipientUpdate] = _GroupCommit(self, self._apply)
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
            await self._ingests.submit([NewMessage(envelope, body, kind)])
        finally:
            self.handing.discard(queue_id)
        return queue_id

    def _commit(self, batch: list[NewMessage]) -> list[Fresh]:
        return self.store.ingest(batch)  # on the queue thread; the store exists once opened

    def _handed(self, fresh: list[Fresh]) -> None:
        """After a commit, on the event loop: the new messages to delivery, or a
        scan to find them if the manager does not run."""
        hand_off = self.hand_off
        for item in fresh:
            self.handing.discard(item.message.id)
            if hand_off is not None:
                hand_off(item)
        if hand_off is None:
            self.changed.set()

    def _apply(self, batch: list[RecipientUpdate]) -> None:
        self.store.apply(batch)

    async def apply(self, updates: list[RecipientUpdate]) -> None:
        """Record outcomes; concurrent calls share one transaction (one fsync)."""
        await self._outcomes.submit(updates)


class _GroupCommit(Generic[T]):
    """Items submitted while a commit runs go together into the next one.

    ``commit`` runs on the queue's thread with everything collected; each
    submitter learns the result of the commit that carried its items.
    """

    def __init__(
        self,
        queue: Queue,
        commit: Callable[[list[T]], Any],
        after: Callable[[Any], None] | None = None,
    ) -> None:
        self._queue = queue
        self._commit = commit
        self._after = after  # on the event loop, with what a successful commit returned
        self._waiting: list[tuple[list[T], asyncio.Future[None]]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def submit(self, items: list[T]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if not self._running:
            self._running = True
            self._task = asyncio.get_running_loop().create_task(self._run())
        await future

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                items = [item for group, _ in batch for item in group]
                try:
                    result = await self._queue.call(functools.partial(self._commit, items))
                except Exception as exc:  # every submitter must hear of it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                if self._after is not None:
                    try:
                        self._after(result)
                    except Exception as exc:  # committed: the scan will find them
                        log.error("hand-off after commit failed", error=repr(exc))
                        self._queue.changed.set()
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._running = False
