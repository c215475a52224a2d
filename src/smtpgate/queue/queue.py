"""The queue as the event loop sees it: group commit and calls into the store.

Every store call runs on one worker thread that owns the SQLite connection,
so the event loop never blocks on disk. :meth:`Queue.ingest` is the only
way a message enters the queue (sessions, bounces, credential mail): calls
that arrive while a commit is running are collected and committed together
in the next transaction, so concurrent sessions share one fsync.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from smtpgate.model.envelope import Envelope
from smtpgate.queue.store import (
    KIND_MAIL,
    NewMessage,
    QueueStore,
    RecipientUpdate,
    clean_orphan_bodies,
)
from smtpgate.spool import SpooledBody

T = TypeVar("T")


class Queue:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="queue")
        self._store: QueueStore | None = None
        self._pending: list[tuple[NewMessage, asyncio.Future[None]]] = []
        self._committing = False
        self._outcomes: list[tuple[list[RecipientUpdate], asyncio.Future[None]]] = []
        self._applying = False
        self.changed = asyncio.Event()

    async def open(self) -> int:
        """Open the store; returns how many orphaned body files were removed."""

        def opening() -> int:
            self._store = QueueStore(self.directory)
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

    async def ingest(self, envelope: Envelope, body: SpooledBody, kind: int = KIND_MAIL) -> str:
        """Make a message durable; returns its queue id. Raises OSError/sqlite3.Error."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((NewMessage(envelope, body, kind), future))
        if not self._committing:
            self._committing = True
            asyncio.get_running_loop().create_task(self._commit_batches())
        await future
        return body.queue_id

    async def _commit_batches(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                messages = [m for m, _ in batch]
                try:
                    await self.call(functools.partial(self.store.commit, messages))
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
                self.changed.set()
        finally:
            self._committing = False

    async def apply(self, updates: list[RecipientUpdate]) -> None:
        """Record outcomes; concurrent calls share one transaction (one fsync)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outcomes.append((updates, future))
        if not self._applying:
            self._applying = True
            asyncio.get_running_loop().create_task(self._apply_batches())
        await future

    async def _apply_batches(self) -> None:
        try:
            while self._outcomes:
                batch, self._outcomes = self._outcomes, []
                updates = [u for group, _ in batch for u in group]
                try:
                    await self.call(functools.partial(self.store.apply, updates))
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._applying = False
