"""Prometheus metrics of the gateway process (prometheus-client).

Counters come from the mail events (``observe.events``) and from every SMTP
reply the server core writes; gauges (sessions, queue, revision, certificate
expiry) are sampled by the gateway every :data:`INTERVAL` seconds. They live
in this process, outside any configuration snapshot, so an apply never resets
them. The admin API runs in another process: the gateway writes the whole
exposition to ``data_dir/metrics.prom`` (0600, replaced atomically, only when
it changed) after each sample, and the API's ``/metrics`` serves that file
(node_exporter's "textfile" pattern; see docs/operations.md "Metrics" for why
not prometheus-client's multiprocess mode). Label values are bounded: listener,
profile and connector names come from the configuration, codes and TLS
versions and ciphers from small fixed sets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from smtpgate.observe.events import (
    Connected,
    ContentVerdict,
    DeliveryAttempt,
    DsnSent,
    Event,
    MessageAccepted,
    Quarantined,
    Refused,
)
from smtpgate.proto.replies import Reply

INTERVAL = 2.0  # seconds between samples (and writes of the exposition file)
FILE = "metrics.prom"
_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


_CLASSES = {n: f"{n}xx" for n in range(10)}


def _tls_labels(tls: str | None) -> tuple[str, str]:
    if not tls:
        return "none", "none"
    parts = tls.split()
    return parts[0], parts[1] if len(parts) > 1 else "?"


class Metrics:
    """The gateway's metrics in a registry of their own; call with an event."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Counter(
            "smtpgate_connections", "SMTP connections by listener and profile, refused included",
            ["listener", "profile"], registry=r,
        )  # fmt: skip
        self.sessions = Gauge(
            "smtpgate_sessions", "Open SMTP sessions by listener", ["listener"], registry=r
        )
        self.replies = Counter(
            "smtpgate_smtp_replies", "SMTP replies sent, by code class and enhanced code",
            ["code_class", "enhanced"], registry=r,
        )  # fmt: skip
        self.accepted = Counter(
            "smtpgate_messages_accepted", "Messages accepted (queued)",
            ["listener", "profile"], registry=r,
        )  # fmt: skip
        self.accepted_bytes = Counter(
            "smtpgate_messages_accepted_bytes", "Size of the messages accepted", registry=r
        )
        self.refused = Counter(
            "smtpgate_refusals", "Connections, commands and messages refused, by stage and code",
            ["stage", "code"], registry=r,
        )  # fmt: skip
        self.quarantined = Counter(
            "smtpgate_messages_quarantined", "Messages held in the quarantine", registry=r
        )
        self.verdicts = Counter(
            "smtpgate_scanner_verdicts", "Content scanners' verdicts",
            ["scanner", "action"], registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "smtpgate_delivery_attempts", "Recipients' delivery attempts by connector and outcome",
            ["connector", "status"], registry=r,
        )  # fmt: skip
        self.attempt_seconds = Histogram(
            "smtpgate_delivery_attempt_seconds", "Time of one delivery attempt (connection"
            " and transmission)", ["connector"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.delay_seconds = Histogram(
            "smtpgate_delivery_delay_seconds", "Arrival to delivery of each sent recipient",
            ["connector"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.tls = Counter(
            "smtpgate_tls", "TLS in use: inbound per accepted message, outbound per attempt",
            ["direction", "version", "cipher"], registry=r,
        )  # fmt: skip
        self.reports = Counter(
            "smtpgate_reports", "Delivery status notifications queued", ["action"], registry=r
        )
        self.queue = Gauge(
            "smtpgate_queue_recipients", "Recipients in the queue by state", ["state"], registry=r
        )
        self.queue_oldest = Gauge(
            "smtpgate_queue_oldest_age_seconds", "Age of the oldest message in the queue",
            registry=r,
        )  # fmt: skip
        self.revision = Gauge(
            "smtpgate_running_revision", "The configuration revision in force (-1: a file)",
            registry=r,
        )  # fmt: skip
        self.certificate_expiry = Gauge(
            "smtpgate_certificate_expiry_timestamp_seconds", "When each configured certificate"
            " expires (Unix time)", ["certificate"], registry=r,
        )  # fmt: skip
        self.tracking_dropped = Gauge(
            "smtpgate_tracking_dropped_events", "Events the tracking store could not keep",
            registry=r,
        )  # fmt: skip
        self.up = Gauge(
            "smtpgate_metrics_timestamp_seconds", "When the gateway wrote these metrics",
            registry=r,
        )  # fmt: skip
        self._written = b""
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # counts not yet in the counters: (counter, label values) → amount
        self._tally: dict[tuple[Any, tuple[str, ...]], float] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: prometheus-client validates and
        locks at every call. Only for the counters and histograms, whose
        children are never removed."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _count(self, counter: Any, *values: str, amount: float = 1.0) -> None:
        """Add to a counter: in a plain dict now (this runs for every reply and
        event; a counter's ``inc`` takes a lock and checks its labels each
        time), into the counter at the next :meth:`sample`, which comes before
        every exposition. Both run on the event loop."""
        key = (counter, values)
        tally = self._tally
        tally[key] = tally.get(key, 0.0) + amount

    def count_reply(self, reply: Reply) -> None:
        self._count(self.replies, _CLASSES[reply.code // 100], reply.status or "")

    def __call__(self, event: Event) -> None:
        count = self._count
        if isinstance(event, Connected):
            count(self.connections, event.client.listener, event.client.profile)
        elif isinstance(event, MessageAccepted):
            c = event.client
            count(self.accepted, c.listener, c.profile)
            count(self.accepted_bytes, amount=event.size)
            count(self.tls, "inbound", *_tls_labels(c.tls))
        elif isinstance(event, Refused):
            if event.stage == "CONNECT":
                count(self.connections, event.client.listener, event.client.profile)
            count(self.refused, event.stage, event.enhanced or str(event.code))
        elif isinstance(event, DeliveryAttempt):
            count(self.attempts, event.connector, event.status)
            self._child(self.attempt_seconds, event.connector).observe(sum(event.delays[2:]))
            if event.status == "sent":
                self._child(self.delay_seconds, event.connector).observe(event.delay)
            if event.relay != "none":
                count(self.tls, "outbound", *_tls_labels(event.tls))
        elif isinstance(event, ContentVerdict):
            for scanner, action in event.results:
                count(self.verdicts, scanner, action)
        elif isinstance(event, DsnSent):
            count(self.reports, event.action)
        elif isinstance(event, Quarantined):
            count(self.quarantined)

    def flush(self) -> None:
        """Move the tallied counts into their counters."""
        tally, self._tally = self._tally, {}
        for (counter, values), amount in tally.items():
            (self._child(counter, *values) if values else counter).inc(amount)

    def sample(self, facts: dict[str, Any]) -> None:
        """Set the gauges from the gateway's facts (see ``app``'s sampler), and
        bring the counters up to date."""
        self.flush()
        self.sessions.clear()
        for listener, count in facts.get("sessions", {}).items():
            self.sessions.labels(listener).set(count)
        self.queue.clear()
        for state, count in facts.get("queue", {}).items():
            self.queue.labels(state).set(count)
        self.queue_oldest.set(facts.get("queue_oldest_age", 0.0))
        revision = facts.get("revision")
        self.revision.set(-1 if revision is None else revision)
        for name, expiry in facts.get("certificates", {}).items():
            self.certificate_expiry.labels(name).set(expiry)
        self.tracking_dropped.set(facts.get("tracking_dropped", 0))
        self.up.set(facts.get("now", 0.0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def write(self, data_dir: Path, peers: list[bytes] | None = None) -> None:
        """Replace ``data_dir/metrics.prom`` with the exposition when it changed;
        with the other workers' expositions (``peers``) merged in."""
        text = self.exposition()
        if peers:
            text = merge_expositions([text, *peers])
        if text == self._written:
            return
        target = data_dir / FILE
        partial = target.with_name(FILE + ".new")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(text)
        os.replace(partial, target)
        self._written = text


# gauges that are a sum over worker processes; the others (queue, revision,
# certificates: one node's facts, sampled by the first worker) are taken from it
_ADDITIVE_GAUGES = frozenset({"smtpgate_sessions", "smtpgate_tracking_dropped_events"})
# the merged metrics are as old as the oldest part
_OLDEST = frozenset({"smtpgate_metrics_timestamp_seconds"})


def _families(text: bytes) -> dict[str, tuple[list[str], dict[str, float]]]:
    """An exposition as family name → (its header lines, sample → value), in order."""
    families: dict[str, tuple[list[str], dict[str, float]]] = {}
    current: tuple[list[str], dict[str, float]] | None = None
    for line in text.decode().splitlines():
        if line.startswith("# HELP "):
            current = families.setdefault(line.split()[2], ([], {}))
            current[0].append(line)
        elif line.startswith("#"):
            if current is not None:
                current[0].append(line)
        elif line and current is not None:
            key, _space, value = line.rpartition(" ")
            current[1][key] = float(value)
    return families


def merge_expositions(texts: list[bytes]) -> bytes:
    """One exposition for several worker processes: counters, histograms and
    the additive gauges summed per sample, the time written as the oldest
    part's, other gauges (and ``_created`` times) as the first text (the
    first worker's) has them."""
    merged: dict[str, tuple[list[str], dict[str, float]]] = {}
    for position, text in enumerate(texts):
        for name, (header, samples) in _families(text).items():
            kind = next((h.split()[3] for h in header if h.startswith("# TYPE ")), "gauge")
            additive = kind in ("counter", "histogram", "summary") or name in _ADDITIVE_GAUGES
            into = merged.setdefault(name, (header, {}))[1]
            for key, value in samples.items():
                if key not in into:
                    into[key] = value
                elif name in _OLDEST:
                    into[key] = min(into[key], value)
                elif additive and position > 0:
                    into[key] += value
    lines = []
    for header, samples in merged.values():
        lines += header
        lines += [f"{key} {value!r}" for key, value in samples.items()]
    return ("\n".join(lines) + "\n").encode()


def read_exposition(data_dir: Path) -> bytes | None:
    """What the gateway last wrote (None: nothing yet)."""
    try:
        return (data_dir / FILE).read_bytes()
    except FileNotFoundError:
        return None
