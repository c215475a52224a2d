"""Health across the process boundary: the gateway's heartbeat, the API's answer.

The REST API (``/healthz``, ``/readyz``, ``/metrics``) runs in a child
process; the listeners, the queue and the counters are in the gateway's. Every
:data:`~smtpgate.observe.metrics.INTERVAL` seconds the gateway samples its
facts (:class:`Heartbeat`) and writes ``data_dir/health.json`` (0600,
replaced atomically: its pid, the time, the listeners bound, whether the
configuration store answers) and the metrics file. ``/readyz`` is ready when
that heartbeat is fresh (at most :data:`STALE` seconds old) from a live
process (with several worker processes: every worker's, each writing its
own under ``data_dir/workers/``), every listener is bound, the store answered the gateway, and the
queue database takes a write lock now (:func:`queue_writable`, probed by the
API's process at request time with a short timeout: a full or read-only
disk, a lost permission or a database locked by someone else all say no).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from smtpgate.observe.log import get_logger
from smtpgate.observe.metrics import INTERVAL, Metrics

log = get_logger("smtpgate.health")

FILE = "health.json"
_ALWAYS = ("now", "pid", "listeners", "store_error", "revision")  # null when not sampled
STALE = 10.0  # seconds: an older heartbeat means the gateway is stuck or gone
PROBE_TIMEOUT = 1.0  # seconds the queue database may take to grant a write lock


def write_health(data_dir: Path, facts: dict[str, Any]) -> None:
    target = data_dir / FILE
    partial = target.with_name(FILE + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(facts, out)
    os.replace(partial, target)


class Heartbeat:
    """Samples the gateway's facts (``sample``, a coroutine returning a dict)
    into the metrics and ``health.json`` every ``interval`` seconds."""

    def __init__(
        self,
        data_dir: Path,
        metrics: Metrics,
        sample: Callable[[], Awaitable[dict[str, Any]]],
        interval: float = INTERVAL,
        peers: Callable[[], list[bytes]] | None = None,
    ) -> None:
        self.data_dir, self.metrics, self.sample, self.interval = (
            data_dir, metrics, sample, interval,
        )  # fmt: skip
        self.peers = peers  # the other workers' expositions, merged into this one's
        self._failing = False
        self._wake = asyncio.Event()

    def soon(self) -> None:
        """Beat now rather than at the end of the interval (a worker took on a revision)."""
        self._wake.set()

    async def beat(self) -> None:
        facts = await self.sample()
        facts["now"] = time.time()
        facts["pid"] = os.getpid()
        self.metrics.sample(facts)
        await asyncio.to_thread(self._write, facts)

    def _write(self, facts: dict[str, Any]) -> None:
        keys: tuple[str, ...] = ("now", "pid", "listeners", "store_error", "revision")
        keys += ("refused", "workers", "scanners")
        health = {k: facts.get(k) for k in keys if k in facts or k in _ALWAYS}
        health["metrics_public"] = facts.get("metrics_public", False)
        write_health(self.data_dir, health)
        self.metrics.write(self.data_dir, self.peers() if self.peers is not None else [])

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
                if self._failing:
                    log.info("heartbeat written again")
                self._failing = False
            except Exception as exc:  # a full disk: say so once, keep trying
                if not self._failing:
                    log.error("heartbeat failed", error=repr(exc))
                self._failing = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()

    def stopped(self) -> None:
        """The gateway stops: not ready any more."""
        with contextlib.suppress(OSError):
            (self.data_dir / FILE).unlink()


def read_health(data_dir: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((data_dir / FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def process_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def queue_writable(data_dir: Path, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the queue database grants a write lock within ``timeout``; else why."""
    path = data_dir / "queue" / "queue.db"
    if not path.exists():
        return "no queue database"
    try:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        try:
            db.execute("begin immediate")
            db.execute("rollback")
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"the queue database is not writable: {exc}"
    return None


def workers_beating(data_dir: Path, count: object, now: float) -> str | None:
    """None when every other worker process (``gateway.workers``) beats; else
    which does not. The first worker's heartbeat is ``health.json`` itself."""
    if not isinstance(count, int):
        return None
    silent = []
    for index in range(1, count):
        beat = read_health(data_dir / "workers" / str(index))
        fresh = beat is not None and now - float(beat.get("now") or 0) <= STALE
        if not fresh or beat is None or not process_alive(beat.get("pid")):
            silent.append(str(index))
    if silent:
        return f"no recent heartbeat from worker {', '.join(silent)} of {count}"
    return None


def readiness(data_dir: Path, now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """(ready, the checks and their findings) for ``/readyz``."""
    now = time.time() if now is None else now
    health = read_health(data_dir)
    checks: dict[str, Any] = {}
    if health is None:
        checks["gateway"] = "no heartbeat (the gateway is not running or not started yet)"
    elif not process_alive(health.get("pid")):
        checks["gateway"] = "the gateway process is gone"
    elif now - float(health.get("now") or 0) > STALE:
        checks["gateway"] = f"the heartbeat is older than {STALE:g} seconds"
    else:
        checks["gateway"] = "ok"
        listeners = health.get("listeners") or {}
        unbound = [name for name, port in listeners.items() if not port]
        checks["listeners"] = f"not bound: {', '.join(unbound)}" if unbound else "ok"
        error = health.get("store_error") or ""
        checks["store"] = f"unreachable: {error}" if error else "ok"
        checks["workers"] = workers_beating(data_dir, health.get("workers"), now) or "ok"
    checks["queue"] = queue_writable(data_dir) or "ok"
    ready = all(value == "ok" for value in checks.values())
    return ready, checks
