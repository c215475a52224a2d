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
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

BUSY_TIMEOUT = 30.0  # seconds a process waits for another one's lock
ROWS_PER_STATEMENT = 50  # rows * columns stays far below SQLite's 32,766 placeholders
_PAUSES = (0.0001, 0.0002, 0.0005, 0.001, 0.002)  # then 0.002 each time


def while_locked(work: Callable[[], T], timeout: float = BUSY_TIMEOUT) -> T:
    """``work`` again after 0.1 ms, growing to 2 ms, while another connection
    holds the lock it needs, for up to ``timeout`` seconds (short pauses: the
    lock is usually held for one commit's fsync, about a millisecond); what
    ``work`` returns."""
    deadline = time.monotonic() + timeout
    for attempt in itertools.count():
        try:
            return work()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(_PAUSES[min(attempt, len(_PAUSES) - 1)])
    raise AssertionError("unreachable")  # itertools.count() does not end


def wal(db: sqlite3.Connection, *, synchronous: str = "full", schema: str = "") -> None:
    """Put ``db`` in WAL mode with ``synchronous`` and create ``schema`` (made
    of ``create ... if not exists``), whoever else opens it at the same time."""

    def set_up() -> None:
        db.execute("pragma journal_mode=wal")
        db.execute(f"pragma synchronous={synchronous}")
        if schema:
            db.executescript(schema)

    while_locked(set_up)


def execute_values(
    db: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]], *, tail: str = ""
) -> None:
    """``head values (?, ...), (?, ...) tail`` for many rows in few statements.

    ``executemany`` runs one SQLite step per row, and the sqlite3 module gives
    the GIL away and takes it back around every step: from a writer thread,
    each step is a thread switch with the event loop (futex wake-ups, costly in
    a virtual machine). Here a statement carries up to
    :data:`ROWS_PER_STATEMENT` rows. ``head`` may start with a ``with`` clause
    whose table is given by the values (``with u(a, b) as (values`` and
    ``tail`` ``) update ...``)."""
    if not rows:
        return
    width = len(rows[0])
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        part = rows[start : start + ROWS_PER_STATEMENT]
        values = ",".join([one] * len(part))
        db.execute(f"{head} values {values}{tail}", [v for r in part for v in r])
