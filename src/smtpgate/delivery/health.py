"""Connector health: per send connector and destination, is the next hop answering?

Each attempt the queue manager makes is recorded against its (connector,
destination) pair, the destination being the smarthost (``host:port``) or the
recipient domain of direct delivery:

* a server greeted us: a success (whatever it then replied: a 5xx from a
  server that answers is the server's verdict, not an outage);
* nothing could be reached (refused, timed out, no 220 greeting, DNS failed
  temporarily) or the connection was lost mid-conversation: a failure, with
  its text kept as ``last_error``.

The state follows the consecutive failures: ``up`` (none), ``failing`` (fewer
than ``down_after``), ``down`` (``down_after`` or more). A connector with
``failover_when_unreachable`` that is *down* for a destination is skipped for
new attempts (the next connector takes them, or they are deferred at once,
instead of each waiting out the connect timeout); every ``probe_interval``
seconds one attempt goes through as the probe, and its success brings the
pair back up. This is a circuit breaker with a half-open probe; the probe is
real mail, so no synthetic traffic is sent to a provider.

The state is held in the gateway's memory and written to
``data_dir/connectors.json`` (0600, replaced atomically, at most once a
second unless a state changes) so that ``smtpgate connector status``, the
REST API and the console, which run in other processes, can show it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from smtpgate.delivery.attempt import AttemptReport, Outcome
from smtpgate.observe.log import get_logger

log = get_logger("smtpgate.health")

FILE = "connectors.json"
WRITE_EVERY = 1.0  # seconds between writes of an unchanged state
MAX_PAIRS = 10_000  # bounded: direct delivery meets many domains
MAX_ERROR = 300  # characters of the last error kept

State = Literal["up", "failing", "down"]


@dataclass
class Health:
    connector: str
    destination: str
    state: State = "up"
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_at: float | None = None
    last_success: float | None = None
    last_attempt: float | None = None  # or the last probe let through


class ConnectorHealth:
    """The board of (connector, destination) pairs; ``settings`` returns
    ``(down_after, probe_interval)`` from the running configuration."""

    def __init__(
        self,
        settings: Callable[[], tuple[int, float]],
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.path = path
        self.clock = clock
        self._pairs: dict[tuple[str, str], Health] = {}
        self._written = 0.0

    def _get(self, connector: str, destination: str) -> Health:
        key = (connector, destination)
        found = self._pairs.get(key)
        if found is None:
            if len(self._pairs) >= MAX_PAIRS:  # forget the healthy, longest unseen first
                oldest = min(
                    self._pairs.values(),
                    key=lambda h: (h.state != "up", h.last_attempt or 0.0),
                )
                del self._pairs[(oldest.connector, oldest.destination)]
            found = self._pairs[key] = Health(connector, destination)
        return found

    def pair(self, connector: str, destination: str) -> Health | None:
        return self._pairs.get((connector, destination))

    def state(self, connector: str, destination: str) -> State:
        found = self._pairs.get((connector, destination))
        return found.state if found else "up"

    def allow(self, connector: str, destination: str) -> bool:
        """May a new attempt go to this pair? Always, unless it is down; a down
        pair lets one probe through every ``probe_interval`` seconds."""
        found = self._pairs.get((connector, destination))
        if found is None or found.state != "down":
            return True
        _, interval = self.settings()
        if self.clock() - (found.last_attempt or 0.0) < interval:
            return False  # (a probe that never reports frees the way after an interval)
        found.last_attempt = self.clock()
        log.info("connector probe", connector=connector, destination=destination)
        return True

    def record(self, connector: str, destination: str, *, ok: bool, error: str = "") -> None:
        down_after, _ = self.settings()
        found = self._get(connector, destination)
        before = found.state
        now = self.clock()
        found.last_attempt = now
        if ok:
            found.consecutive_failures, found.state, found.last_success = 0, "up", now
        else:
            found.consecutive_failures += 1
            found.last_error, found.last_error_at = error[:MAX_ERROR], now
            found.state = "down" if found.consecutive_failures >= down_after else "failing"
        if found.state != before:
            log.warning(
                "connector state",
                connector=connector,
                destination=destination,
                state=found.state,
                was=before,
                failures=found.consecutive_failures,
                error=found.last_error if not ok else None,
            )
        self.save(changed=found.state != before)

    def rows(self) -> list[dict[str, Any]]:
        return [
            asdict(h)
            for h in sorted(self._pairs.values(), key=lambda h: (h.connector, h.destination))
        ]

    def save(self, *, changed: bool = True) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not changed and now - self._written < WRITE_EVERY:
            return
        self._written = now
        try:
            write_status(self.path, {"written": self.clock(), "pairs": self.rows()})
        except OSError as exc:
            log.error("cannot write connector health", path=str(self.path), error=str(exc))


def write_status(path: Path, facts: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(facts, out)
    os.replace(partial, path)


def status_path(data_dir: Path, worker: int = 0) -> Path:
    """Where worker ``worker`` of the gateway writes its board (each worker
    process keeps its own: it sees its own attempts)."""
    return data_dir / FILE if worker == 0 else data_dir / "workers" / str(worker) / FILE


def read_status(data_dir: Path) -> list[dict[str, Any]]:
    """The pairs the running gateway's workers last wrote (empty when none
    wrote any); a pair several workers tried is shown as the one that tried
    it last saw it."""
    latest: dict[tuple[Any, Any], dict[str, Any]] = {}
    for path in [data_dir / FILE, *sorted(data_dir.glob(f"workers/*/{FILE}"))]:
        for pair in _pairs(path):
            key = (pair.setdefault("connector", ""), pair.setdefault("destination", ""))
            known = latest.get(key)
            if known is None or (pair.get("last_attempt") or 0) > (known.get("last_attempt") or 0):
                latest[key] = pair
    return sorted(latest.values(), key=lambda p: (str(p["connector"]), str(p["destination"])))


def _pairs(path: Path) -> list[dict[str, Any]]:
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    pairs = facts.get("pairs", []) if isinstance(facts, dict) else []
    return [p for p in pairs if isinstance(p, dict)]


def status_table(pairs: list[dict[str, Any]], configured: list[str]) -> list[dict[str, Any]]:
    """One row per pair, plus a row for each configured connector never tried."""
    seen = {p.get("connector") for p in pairs}
    rows = [p for p in pairs if p.get("connector") in configured]
    rows += [
        {"connector": name, "destination": "-", "state": "unknown", "consecutive_failures": 0}
        for name in configured
        if name not in seen
    ]
    return sorted(rows, key=lambda r: (configured.index(r["connector"]), r["destination"]))


def skipped(
    connector: str, destination: str, health: ConnectorHealth, idxs: list[int]
) -> AttemptReport:
    """The report of an attempt not made: the pair is down (no server reached, so a
    failover connector may take over; without one, the recipients are deferred)."""
    found = health.pair(connector, destination)
    last = f" (last error: {found.last_error})" if found and found.last_error else ""
    text = f"4.4.1 connector {connector} is down for {destination}{last}; not tried"
    return AttemptReport([Outcome(idx, None, text) for idx in idxs], reached=False)


def failed(report: AttemptReport) -> str | None:
    """The failure an attempt's report shows (None: a server answered)."""
    if report.reached and not report.connection_lost:
        return None
    return report.outcomes[0].text if report.outcomes else "unreachable"
