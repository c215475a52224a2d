"""Hearing of applied revisions: PostgreSQL's LISTEN/NOTIFY, with the poll as safety net.

An apply adds a revision, and on PostgreSQL the store notifies
``REVISION_CHANNEL`` in the same transaction (``ConfigStore.add_revision``), so
the notification comes only once the revision is committed and carries only
its number. A node follows the store with::

    async with RevisionWatcher.for_store(store) as watcher:
        while True:
            await watcher.wait(poll_interval)
            number = store.applied_number()  # the store is the truth, not the payload

``wait`` returns when a notification arrives or after ``timeout``, whichever is
first, so a lost notification costs at most one poll interval. The watcher
holds a connection of its own (autocommit, ``LISTEN``); whenever it
(re)connects it LISTENs first and then wakes ``wait`` once, so the caller reads
the current revision and misses nothing applied while it was away. A lost
connection is re-made in the background with a growing pause; ``wait`` never
raises for it (a store that is down means ``wait`` sleeps out its timeout). On
SQLite there is no channel: ``wait`` is the poll's sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

import psycopg
import structlog

from smtpgate.config.store import REVISION_CHANNEL, ConfigStore, masked

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("smtpgate.config.watch")

RETRY_FIRST = 0.5  # seconds before reconnecting after a lost or refused connection
RETRY_MAX = 30.0  # ... doubling up to this
# A peer that vanishes without closing the connection is noticed by TCP keepalives
# within about a minute, unless the store URL sets its own.
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


class RevisionWatcher:
    """Wakes its caller when a revision is applied (PostgreSQL), else at each poll."""

    def __init__(self, parameters: dict[str, Any] | None, where: str = "") -> None:
        """``parameters``: keyword arguments for ``psycopg.connect`` (the password
        among them, never logged), ``None`` for polling only; ``where``: the store
        as it may be shown in the log."""
        self._parameters = None if parameters is None else KEEPALIVES | parameters
        self._where = where
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.listening = False  # a LISTEN connection is up
        self.notifications = 0  # notifications heard (for status and tests)
        self.announced: int | None = None  # the revision the last one named
        self.connections = 0  # LISTEN connections made
        self.error = ""  # why the last connection failed or ended ("" while listening)

    @classmethod
    def for_store(cls, store: ConfigStore) -> RevisionWatcher:
        return cls(store.listen_parameters(), masked(store.engine.url))

    async def wait(self, timeout: float) -> bool:
        """Return after ``timeout`` seconds (``False``), or earlier (``True``) when a
        revision was announced or the LISTEN connection was (re)made since the last
        call: either way the caller then reads the applied revision."""
        if self._parameters is None or self._closed:
            await asyncio.sleep(timeout)
            return False
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return False
        self._wake.clear()  # before the caller reads: a later notification wakes it again
        return True

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.listening = False

    async def __aenter__(self) -> RevisionWatcher:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _listen(self) -> None:
        """Keep one LISTEN connection up, reconnecting with a growing pause."""
        assert self._parameters is not None
        pause = RETRY_FIRST
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    **self._parameters, autocommit=True
                )
                async with connection:
                    await connection.execute(f"LISTEN {REVISION_CHANNEL}")
                    self._connected()
                    pause = RETRY_FIRST
                    async for notification in connection.notifies():
                        self._heard(notification.payload)
            except Exception as exc:  # any failure: reconnect later, never raise
                self._lost(exc)
            else:  # the server ended the notification stream without an error
                self._lost(None)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    def _connected(self) -> None:
        self.connections += 1
        if self.error or self.connections > 1:
            log.info("listening for applied revisions again", store=self._where)
        self.listening, self.error = True, ""
        self._wake.set()  # LISTEN first, then the caller reads what it may have missed

    def _heard(self, payload: str) -> None:
        self.notifications += 1
        with contextlib.suppress(ValueError):
            self.announced = int(payload)
        self._wake.set()

    def _lost(self, exc: Exception | None) -> None:
        reason = self._reason(exc)
        if self.listening or not self.error:  # once per outage, not at every retry
            log.warning("not listening for applied revisions", store=self._where, error=reason)
        self.listening, self.error = False, reason

    def _reason(self, exc: Exception | None) -> str:
        """The driver's one-line reason, never the password."""
        if exc is None:
            return "connection closed"
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        password = (self._parameters or {}).get("password")
        return reason.replace(str(password), "***") if password else reason
