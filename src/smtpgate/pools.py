"""Thread pools of their own for blocking work that waits on other machines.

The event loop's default executor has ``min(32, cores + 4)`` threads (six
on two cores) and everything shares it: heartbeat and metrics writes,
quarantine files, DKIM signing. A slow directory, mail server or name
server must never take those threads: twelve messages from domains whose
name servers answered slowly once held every one of them, and the sender
checks queued behind them timed out into ``temperror``, which switched
DMARC off for everybody else. So each kind of work that waits on the
network has its pool here, sized for waiting (a waiting thread costs a
little memory, no CPU), and its time budget counts from the moment a
thread takes the job, not from when it was queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Pool:
    """A named pool of ``threads``, made at first use, one per process."""

    def __init__(self, name: str, threads: int) -> None:
        self.name, self.threads = name, threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
            return self._executor

    async def run(
        self,
        work: Callable[..., T],
        *args: Any,
        limit: float | None = None,
        wait: float | None = None,
    ) -> T:
        """``work(*args)`` on this pool. With ``limit``, TimeoutError once it
        has run that many seconds (each step of ``work`` should be bounded
        already: this is the net); with ``wait``, :class:`PoolBusy` when no
        thread took it within that many seconds (every thread is waiting on
        something slow). Cancelled while waiting for a thread, it never runs;
        a thread already running it finishes it in the background."""
        loop = asyncio.get_running_loop()
        if limit is None and wait is None:
            return await loop.run_in_executor(self._pool(), work, *args)
        began = False
        try:
            at = None if wait is None else loop.time() + wait
            async with asyncio.timeout_at(at) as deadline:

                def started() -> None:  # on the loop, when a thread takes the job
                    nonlocal began
                    began = True
                    with contextlib.suppress(RuntimeError):  # it has ended already
                        deadline.reschedule(None if limit is None else loop.time() + limit)

                def job() -> T:
                    loop.call_soon_threadsafe(started)
                    return work(*args)

                return await loop.run_in_executor(self._pool(), job)
        except TimeoutError:
            if began:
                raise
            raise PoolBusy(f"no {self.name} thread free within {wait:g} s") from None


class PoolBusy(Exception):  # noqa: N818 - what the caller is told, as a sentence
    """Every thread of a pool stayed busy for as long as the caller would wait."""
