"""Which gateways run which revision, and waiting for an apply to be in force.

A running gateway reports what it runs under ``node:<name>`` in the store's
meta table: when it starts, after each applied revision it takes on (or
cannot take on), and as a heartbeat every ``HEARTBEAT`` seconds. A report
older than ``STALE_AFTER`` means the node is down (stopped, killed, cut off).

``config apply`` returns only when every live node runs the new revision,
reports that it cannot, or the wait times out: once it says "applied" and
"running", every new connection gets the new policy. A gateway swaps its
snapshot before it reports, so the report can never run ahead of the policy.
A gateway that stops (SIGTERM) says so in a last report (``stopped``): it is
down at once, so an apply does not wait for it and no one mistakes it for a
node that stopped answering.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from smtpgate.config.document import Document, local_part, normalise
from smtpgate.config.store import ConfigStore
from smtpgate.errors import Conflict, NotFound
from smtpgate.files import write_private

HEARTBEAT = 2.0  # seconds between a running gateway's reports
STALE_AFTER = 3 * HEARTBEAT  # a node silent for longer is down
POLL = 0.05  # how often a waiting apply reads the reports

State = Literal["applied", "failed", "not answering", "down"]


@dataclass(frozen=True)
class NodeOutcome:
    """What one node made of an applied revision."""

    node: str
    state: State
    detail: str = ""

    @property
    def counts(self) -> bool:
        """Whether this outcome makes the apply incomplete (down nodes do not:
        they take on the current revision when they start)."""
        return self.state in ("failed", "not answering")

    def as_dict(self) -> dict[str, str]:
        return {"node": self.node, "state": self.state, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.node}: {self.state}" + (f" ({self.detail})" if self.detail else "")


def publish(store: ConfigStore, node: str, status: dict[str, Any], now: float) -> None:
    """Record what this node runs; ``now`` (wall-clock seconds) is its heartbeat."""
    with store.transaction() as connection:
        store.set_meta(connection, f"node:{node}", json.dumps({**status, "seen": now}))


def reports(store: ConfigStore) -> dict[str, dict[str, Any]]:
    """Every node's last report, by node name."""
    found = store.metas("node:")
    return {key.removeprefix("node:"): json.loads(value) for key, value in found.items()}


def outcome(node: str, report: dict[str, Any], revision: int, now: float) -> NodeOutcome | None:
    """The node's outcome for ``revision``; None while a live node has not got there."""
    age = now - float(report.get("seen", 0))
    if report.get("stopped"):
        return NodeOutcome(node, "down", f"stopped {max(age, 0):.0f} s ago")
    if age > STALE_AFTER:
        return NodeOutcome(node, "down", f"last seen {age:.0f} s ago")
    running = report.get("running_revision")
    if isinstance(running, int) and running >= revision:
        return NodeOutcome(node, "applied", f"running revision {running}")
    if report.get("refused_revision") == revision:
        return NodeOutcome(node, "failed", str(report.get("error") or "cannot take it on"))
    return None


def wait_applied(
    store: ConfigStore,
    revision: int,
    timeout: float,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> list[NodeOutcome]:
    """Wait until every live node has an outcome for ``revision`` (or ``timeout``
    seconds have passed); the outcomes, by node name."""
    deadline = clock() + timeout
    while True:
        now, seen = clock(), reports(store)
        found = {name: outcome(name, r, revision, now) for name, r in seen.items()}
        if all(found.values()) or now >= deadline:
            return [found[name] or _late(name, seen[name], timeout) for name in sorted(seen)]
        sleep(POLL)


def _late(node: str, report: dict[str, Any], timeout: float) -> NodeOutcome:
    running = report.get("running_revision")
    return NodeOutcome(node, "not answering", f"still on revision {running} after {timeout:g} s")


def apply_report(outcomes: list[NodeOutcome]) -> dict[str, Any]:
    """The per-node part of an apply's answer: ``complete`` unless a live node
    failed or did not answer in time."""
    return {
        "nodes": [o.as_dict() for o in outcomes],
        "complete": not any(o.counts for o in outcomes),
    }


DOWN_AFTER = 60.0  # a node silent for longer than this is down, not just stale


def liveness(age: float, *, stopped: bool = False) -> str:
    """ "up" (reporting), "stale" (missed a few heartbeats), or "down" (silent
    for long, or ``stopped``: it said so when it stopped)."""
    if stopped:
        return "down"
    if age <= STALE_AFTER:
        return "up"
    return "stale" if age <= DOWN_AFTER else "down"


def cluster(store: ConfigStore, now: float) -> dict[str, Any]:
    """``smtpgate cluster status``: the applied revision and every node's last report."""
    applied = store.applied_number()
    found = []
    for name, report in sorted(reports(store).items()):
        age = now - float(report.get("seen", 0))
        running = report.get("running_revision")
        found.append(
            {
                "node": name,
                "state": liveness(age, stopped=bool(report.get("stopped"))),
                "stopped": bool(report.get("stopped")),
                "seen_seconds_ago": round(age, 1),
                "running_revision": running,
                "lag": applied - running
                if isinstance(applied, int) and isinstance(running, int)
                else None,
                "error": report.get("error") or None,
                "refused_revision": report.get("refused_revision"),
                "roles": report.get("roles", []),
                "version": report.get("version"),
                "admin": report.get("admin"),
                "hostname": report.get("hostname"),
                "pid": report.get("pid"),
                "workers": report.get("workers", 1),
                "queue": report.get("queue", {}),
                "scanners": report.get("scanners", {}),
            }
        )
    return {"applied_revision": applied, "nodes": found}


def forget(store: ConfigStore, node: str, now: float, *, force: bool = False) -> None:
    """Remove a node that left from the list; one that is up needs ``force``."""
    report = reports(store).get(node)
    if report is None:
        raise NotFound(f"no node {node!r} has reported to this store")
    age = now - float(report.get("seen", 0))
    if not force and liveness(age, stopped=bool(report.get("stopped"))) == "up":
        raise Conflict(f"node {node!r} is up (it reported within {STALE_AFTER:g} s); use --force")
    with store.transaction() as connection:
        store.delete_meta(connection, f"node:{node}")


# -- the last revision this node ran, for starting while the store is down ---------

CACHE = "applied-revision.json"


def remember_applied(data_dir: Path, revision: int | None, document: Document) -> None:
    """Keep the revision this node runs in ``data_dir`` (0600, written atomically),
    so that a restart while the store is unreachable still starts with it."""
    if revision is not None:
        data = json.dumps({"revision": revision, "document": document}).encode()
        write_private(data_dir / CACHE, data)


def cached_applied(data_dir: Path) -> tuple[int, Document] | None:
    """The revision this node last ran, if it kept one."""
    try:
        found = json.loads((data_dir / CACHE).read_bytes())
        return int(found["revision"]), found["document"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- this node's local settings, for the API process and the CLI -------------------

LOCAL_FILE = "node.json"


def remember_local(data_dir: Path, local: Document) -> None:
    """Note this node's local settings (from its configuration file) in
    ``data_dir``, where the API process and the CLI, which only know the data
    directory, find them."""
    write_private(data_dir / LOCAL_FILE, json.dumps(local).encode())


def has_local(data_dir: Path) -> bool:
    return (data_dir / LOCAL_FILE).exists()


def known_local(data_dir: Path) -> Document:
    """This node's local settings as ``serve`` noted them; before the first
    ``serve``, only the data directory."""
    try:
        found = json.loads((data_dir / LOCAL_FILE).read_bytes())
    except (OSError, ValueError):
        found = None
    if isinstance(found, dict) and isinstance(found.get("gateway"), dict):
        return found
    return local_part(normalise({"gateway": {"data_dir": str(data_dir)}}))
