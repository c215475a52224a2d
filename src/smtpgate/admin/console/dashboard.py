"""The dashboard's facts: peers and their revisions, the queue, certificates
expiring soon, the latest changes. Each fact fails on its own (a missing
certificate file does not hide the queue)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from smtpgate.admin import nodes
from smtpgate.config.load import parse_config

if TYPE_CHECKING:
    from smtpgate.admin.console.app import Console

RECENT = 8  # audit entries shown


def facts(console: Console) -> dict[str, Any]:
    service = console.service
    now = console.clock()
    out: dict[str, Any] = {"cluster": nodes.cluster(service.store, now)}
    out["queue"] = _queue(service.data_dir)
    out["certificates"], out["certificate_error"] = _certificates(console)
    out["recent"] = [e.as_dict() for e in service.store.audit_log(RECENT)]
    return out


def _queue(data_dir: Any) -> dict[str, int]:
    from smtpgate.queue.store import QueueStore  # noqa: PLC0415

    store = QueueStore(data_dir / "queue")
    try:
        return store.counts()
    finally:
        store.close()


def _certificates(console: Console) -> tuple[list[dict[str, object]], str]:
    """Every configured certificate with its expiry, soonest first."""
    from smtpgate.tls.certificates import describe, load_configured  # noqa: PLC0415

    try:
        config = parse_config(console.service.applied().document)
        loaded = load_configured(config)
    except Exception as exc:
        return [], str(exc)
    now = dt.datetime.fromtimestamp(console.clock(), dt.UTC)
    found = [describe(item, now) for item in loaded.values()]
    return sorted(found, key=lambda f: str(f["not_after"])), ""
