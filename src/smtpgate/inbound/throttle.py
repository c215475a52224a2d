"""The SMTP AUTH failure throttle shared by the worker processes of one gateway.

``policy.auth.AuthThrottle`` keeps failures per client address in one
process's memory. With several workers (``gateway.workers``) a client's
connections land on any of them, so each would count only its share and an
attacker would get ``workers`` times the attempts before every worker locked
him out. :class:`SharedAuthThrottle` keeps the same rules (failures within
``limits.auth_failure_window``, lockout after ``max_auth_failures`` for
``auth_lockout`` seconds, a growing delay) in a small SQLite database under
``data_dir/workers/`` that every worker uses. Times are the event loop's
monotonic clock, the same in every process of one boot; the supervisor
starts each run with an empty database, as one process starts with an empty
dictionary. A database that fails falls back to this process's own memory,
logged once: the throttle never stops AUTH from being answered.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from smtpgate.config.schema import Limits
from smtpgate.databases import wal
from smtpgate.files import private_file
from smtpgate.observe.log import get_logger
from smtpgate.policy.auth import AuthThrottle

log = get_logger("smtpgate.auth")

FILE = "auth-throttle.db"
_SCHEMA = """
create table if not exists failures(ip text not null, at real not null);
create index if not exists failures_ip on failures(ip, at);
create index if not exists failures_at on failures(at);
create table if not exists locks(ip text primary key, until real not null);
"""


def create(directory: Path) -> Path:
    """A new, empty database for this run (the supervisor, before any worker)."""
    path = directory / FILE
    for stale in (path, path.with_name(FILE + "-wal"), path.with_name(FILE + "-shm")):
        stale.unlink(missing_ok=True)
    db = sqlite3.connect(private_file(path), isolation_level=None)
    try:
        wal(db, schema=_SCHEMA)
    finally:
        db.close()
    return path


class SharedAuthThrottle:
    """:class:`~smtpgate.policy.auth.AuthThrottle`'s rules over every worker."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.limits = limits
        self.fallback = AuthThrottle(limits)  # while the database fails
        self._failing = False
        self.db = sqlite3.connect(path, isolation_level=None, timeout=2)
        self.db.execute("pragma synchronous=off")  # nothing here must survive a crash

    def _failed(self, exc: sqlite3.Error) -> None:
        if not self._failing:
            log.error("shared AUTH throttle unavailable: counting in this worker", error=str(exc))
        self._failing = True

    def locked(self, ip: str, now: float) -> bool:
        try:
            row = self.db.execute("select until from locks where ip = ?", (ip,)).fetchone()
            if row is not None and now >= row[0]:
                self.db.execute("begin immediate")
                self.db.execute("delete from locks where ip = ? and until <= ?", (ip, now))
                self.db.execute("delete from failures where ip = ?", (ip,))
                self.db.execute("commit")
                row = None
        except sqlite3.Error as exc:
            self._rollback()
            self._failed(exc)
            return self.fallback.locked(ip, now)
        return row is not None

    def record_failure(self, ip: str, now: float) -> float:
        """Count a failure; returns how long to wait before answering it."""
        limits = self.limits
        try:
            self.db.execute("begin immediate")
            since = now - limits.auth_failure_window
            self.db.execute("delete from failures where at <= ?", (since,))  # bounded
            self.db.execute("insert into failures values (?, ?)", (ip, now))
            (count,) = self.db.execute(
                "select count(*) from failures where ip = ?", (ip,)
            ).fetchone()
            if count >= limits.max_auth_failures:
                self.db.execute(
                    "insert or replace into locks values (?, ?)", (ip, now + limits.auth_lockout)
                )
            self.db.execute("commit")
        except sqlite3.Error as exc:
            self._rollback()
            self._failed(exc)
            return self.fallback.record_failure(ip, now)
        return min(5.0, limits.auth_failure_delay * int(count))

    def record_success(self, ip: str) -> None:
        try:
            self.db.execute("delete from failures where ip = ?", (ip,))
        except sqlite3.Error as exc:
            self._failed(exc)
        self.fallback.record_success(ip)

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("rollback")
