"""SQLite databases that several processes open: the worker processes, the
API process and the command-line tools share the queue, tracking, TLS report
and throttle databases in ``data_dir``.

SQLite waits (its busy handler) for most locks, but not for the exclusive lock
that turns a new database into WAL mode: a second process opening the same new
database at that moment is refused at once with "database is locked". Every
database of the gateway is set up through :func:`wal`, which tries again.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Callable

BUSY_TIMEOUT = 30.0  # seconds a process waits for another one's lock
_PAUSES = (0.0001, 0.0002, 0.0005, 0.001, 0.002)  # then 0.002 each time


def while_locked(work: Callable[[], object], timeout: float = BUSY_TIMEOUT) -> None:
    """``work`` again after 0.1 ms, growing to 2 ms, while another connection
    holds the lock it needs, for up to ``timeout`` seconds (short pauses: the
    lock is usually held for one commit's fsync, about a millisecond)."""
    deadline = time.monotonic() + timeout
    for attempt in itertools.count():
        try:
            work()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(_PAUSES[min(attempt, len(_PAUSES) - 1)])
        else:
            return


def wal(db: sqlite3.Connection, *, synchronous: str = "full", schema: str = "") -> None:
    """Put ``db`` in WAL mode with ``synchronous`` and create ``schema`` (made
    of ``create ... if not exists``), whoever else opens it at the same time."""

    def set_up() -> None:
        db.execute("pragma journal_mode=wal")
        db.execute(f"pragma synchronous={synchronous}")
        if schema:
            db.executescript(schema)

    while_locked(set_up)
