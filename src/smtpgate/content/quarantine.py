"""The quarantine: messages held by a scanner's verdict.

Node-local and durable like the queue, in ``data_dir/quarantine``: per
message its body (``ID.eml``, with the scanners' header fields written in)
and its metadata (``ID.json``: the envelope, when and by which profile it
came, the verdicts summary and each scanner's action, reason and detail).
:meth:`Quarantine.hold` fsyncs the body, the metadata (written atomically,
``files.write_private``) and the directory before it returns, so the client
hears 250 only for a message that survives a crash. An entry exists once its
metadata does; a body without one (a crash inside ``hold``) is removed when
the gateway starts.

:class:`QuarantineStore` is the synchronous store that the gateway, the API
process and the CLI each open on the same directory (the queue tools do the
same with the queue database). ``release`` puts the message into the queue
store with its quarantine id as queue id (``QueueStore.ingest``, the queue's
one way in: a running gateway's queue manager picks it up within a second)
and then removes the entry; a second release of the same message finds the id
taken and only removes the entry, so a message is never queued twice.
Entries older than ``quarantine.retention_days`` are deleted by the running
gateway (:meth:`Quarantine.expire_forever`), on the clock it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smtpgate.content.apply import write_verdicts
from smtpgate.content.verdict import Outcome
from smtpgate.errors import NotFound, QueueError
from smtpgate.files import private_dir, write_private
from smtpgate.model.envelope import Envelope, MailParams, RcptParams, Recipient
from smtpgate.observe.log import get_logger
from smtpgate.queue.clock import SYSTEM_CLOCK, Clock
from smtpgate.queue.store import NewMessage, QueueStore
from smtpgate.spool import SpooledBody, fsync_path

log = get_logger("smtpgate.quarantine")

EXPIRY_INTERVAL = 600.0  # seconds between looks for expired entries
DAY = 86400.0
_ID = re.compile(r"^[0-9A-Za-z]{1,64}$")


# -- the envelope as JSON ----------------------------------------------------------


def envelope_dict(envelope: Envelope) -> dict[str, Any]:
    return {
        "sender": envelope.sender,
        "recipients": [{"address": r.address, **r.params.as_dict()} for r in envelope.recipients],
        "params": envelope.mail_params.as_dict(),
        "helo": envelope.helo,
        "client_ip": envelope.client_ip,
        "client_port": envelope.client_port,
        "tls": envelope.tls,
        "auth_user": envelope.auth_user,
        "spam_check": envelope.spam_check,
        "profile": envelope.profile,
    }


def envelope_of(raw: dict[str, Any]) -> Envelope:
    recipients = tuple(Recipient(r["address"], RcptParams.from_dict(r)) for r in raw["recipients"])
    return Envelope(
        raw["sender"],
        recipients,
        MailParams.from_dict(raw.get("params", {})),
        helo=raw.get("helo", ""),
        client_ip=raw.get("client_ip", ""),
        client_port=raw.get("client_port", 0),
        tls=raw.get("tls"),
        auth_user=raw.get("auth_user"),
        spam_check=raw.get("spam_check", True),
        profile=raw.get("profile", ""),
    )


def _results(outcome: Outcome) -> list[dict[str, Any]]:
    return [
        {
            "scanner": r.scanner,
            "action": r.action,
            "reason": r.reason,
            "detail": json.loads(json.dumps(r.detail, default=str)),
            "reply": r.reply.text() if r.reply is not None else None,
        }
        for r in outcome.results
    ]


# -- the store ---------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """One quarantined message's metadata (``ID.json``)."""

    id: str
    held_at: float
    size: int
    envelope: Envelope
    summary: str
    results: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "held_at": self.held_at,
            "size": self.size,
            "envelope": envelope_dict(self.envelope),
            "summary": self.summary,
            "results": self.results,
        }

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Held:
        return cls(
            raw["id"],
            float(raw["held_at"]),
            int(raw["size"]),
            envelope_of(raw["envelope"]),
            raw.get("summary", ""),
            list(raw.get("results", [])),
        )


class QuarantineStore:
    """The quarantine directory of one node (synchronous: call it off the loop)."""

    def __init__(self, directory: Path, clock: Clock = SYSTEM_CLOCK) -> None:
        self.directory = private_dir(directory)
        self.clock = clock

    def _meta(self, message_id: str) -> Path:
        if not _ID.match(message_id):
            raise NotFound(f"no message {message_id!r} in the quarantine")
        return self.directory / f"{message_id}.json"

    def body_path(self, message_id: str) -> Path:
        return self._meta(message_id).with_suffix(".eml")

    def hold(self, envelope: Envelope, body: SpooledBody, outcome: Outcome) -> Held:
        """Keep ``body`` durably with its verdicts; the body is moved (spilled)
        or written (in memory) here."""
        write_verdicts(body, outcome)  # the scanners' fields: a released message keeps them
        size = body.size
        target = self.body_path(body.queue_id)
        body.save_as(target, fsync=True)
        fsync_path(self.directory)  # the body's name, before the metadata naming it
        held = Held(
            body.queue_id, self.clock.now(), size, envelope, outcome.summary(), _results(outcome)
        )
        write_private(self._meta(held.id), json.dumps(held.as_dict(), indent=1).encode())
        return held

    def entries(self) -> list[Held]:
        """Every entry, oldest first (an entry removed meanwhile is skipped)."""
        found = []
        for path in self.directory.glob("*.json"):
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                found.append(Held.of(json.loads(path.read_bytes())))
        return sorted(found, key=lambda h: (h.held_at, h.id))

    def get(self, message_id: str) -> Held:
        try:
            return Held.of(json.loads(self._meta(message_id).read_bytes()))
        except FileNotFoundError:
            raise NotFound(f"no message {message_id!r} in the quarantine") from None

    def head(self, message_id: str, limit: int = 64 * 1024) -> bytes:
        """The first ``limit`` octets of the body (for ``show``)."""
        self.get(message_id)
        with self.body_path(message_id).open("rb") as body:
            return body.read(limit)

    def delete(self, message_id: str) -> Held:
        """Remove an entry: its metadata first (it is gone), then its body."""
        held = self.get(message_id)
        self._remove(message_id)
        return held

    def _remove(self, message_id: str) -> None:
        self._meta(message_id).unlink(missing_ok=True)
        self.body_path(message_id).unlink(missing_ok=True)
        fsync_path(self.directory)

    def release(self, message_id: str, queue: QueueStore, spool_dir: Path) -> Held:
        """Queue the message as if it had been clean, then remove the entry.
        The body is copied (through ``spool_dir``, like a received one): should
        the queue refuse it, the entry stays as it was."""
        held = self.get(message_id)
        copy = SpooledBody(private_dir(spool_dir), held.id)
        try:
            with self.body_path(message_id).open("rb") as source:
                while chunk := source.read(65536):
                    copy.write(chunk)
            copy.finish()
            queue.ingest([NewMessage(held.envelope, copy)])
        except FileNotFoundError:
            raise NotFound(f"no message {message_id!r} in the quarantine") from None
        except QueueError:
            if queue.get(held.id) is None:  # not a release of one released already
                raise
            log.warning("quarantined message was already queued", id=held.id)
        finally:
            copy.discard()
        self._remove(message_id)
        return held

    def expire(self, retention: float) -> list[str]:
        """Delete the entries held longer than ``retention`` seconds; their ids."""
        now = self.clock.now()
        gone = [h.id for h in self.entries() if h.held_at + retention <= now]
        for message_id in gone:
            self._remove(message_id)
        return gone

    def clean_orphans(self) -> int:
        """Remove bodies without metadata and unfinished metadata (a crash in
        ``hold``); call it before the gateway accepts mail."""
        removed = 0
        for path in self.directory.iterdir():
            orphan = path.name.endswith(".tmp") or (
                path.suffix == ".eml" and not path.with_suffix(".json").exists()
            )
            if orphan:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class Quarantine:
    """The gateway's quarantine: ``hold`` from sessions, expiry in the background.

    ``retention`` gives the current retention in seconds (the applied
    configuration's ``quarantine.retention_days``); ``clock`` stamps and ages
    entries; ``wake`` makes the expiry task look at once (tests)."""

    def __init__(
        self,
        directory: Path,
        retention: Callable[[], float],
        clock: Clock = SYSTEM_CLOCK,
        interval: float = EXPIRY_INTERVAL,
    ) -> None:
        self.store = QuarantineStore(directory, clock)
        self.retention = retention
        self.interval = interval
        self.wake = asyncio.Event()

    @property
    def clock(self) -> Clock:
        return self.store.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self.store.clock = clock

    async def hold(self, envelope: Envelope, body: SpooledBody, outcome: Outcome) -> None:
        """Keep the message (durably) with the verdicts that held it."""
        await asyncio.to_thread(self.store.hold, envelope, body, outcome)

    async def expire_once(self) -> list[str]:
        gone = await asyncio.to_thread(self.store.expire, self.retention())
        if gone:
            log.info("quarantine expired", count=len(gone), ids=gone)
        return gone

    async def expire_forever(self) -> None:
        """Every ``interval`` (or when woken), delete what outlived its retention."""
        while True:
            try:
                await self.expire_once()
            except OSError as exc:
                log.error("quarantine expiry failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval)
            self.wake.clear()


def quarantine_dir(data_dir: Path) -> Path:
    return data_dir / "quarantine"


def spool_dir(data_dir: Path) -> Path:
    return data_dir / "spool"


def when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def entry_dict(held: Held) -> dict[str, Any]:
    """An entry as the CLI, the API and the console show it."""
    decided = next((r for r in held.results if r["action"] == "quarantine"), None)
    return {
        "id": held.id,
        "held_at": when(held.held_at),
        "size": held.size,
        "sender": held.envelope.sender,
        "recipients": [r.address for r in held.envelope.recipients],
        "client": held.envelope.client_ip,
        "profile": held.envelope.profile,
        "scanner": decided["scanner"] if decided else "",
        "reason": decided["reason"] if decided else held.summary,
        "summary": held.summary,
        "results": held.results,
    }


def show_dict(store: QuarantineStore, message_id: str) -> dict[str, Any]:
    """One entry with its envelope and the message's header section."""
    held = store.get(message_id)
    head = store.head(message_id)
    end = head.find(b"\r\n\r\n")
    headers = head[: end + 2] if end >= 0 else head
    return entry_dict(held) | {
        "envelope": envelope_dict(held.envelope),
        "headers": headers.decode("utf-8", "replace"),
    }


def release(data_dir: Path, message_id: str) -> dict[str, Any]:
    """Release from ``data_dir``'s quarantine into its queue (another process
    than the gateway: the queue tools' way, the gateway picks it up)."""
    queue = QueueStore(data_dir / "queue")
    try:
        held = QuarantineStore(quarantine_dir(data_dir)).release(
            message_id, queue, spool_dir(data_dir)
        )
    finally:
        queue.close()
    return {"id": held.id, "result": "released", "queue_id": held.id}


def delete(data_dir: Path, message_id: str) -> dict[str, Any]:
    held = QuarantineStore(quarantine_dir(data_dir)).delete(message_id)
    return {"id": held.id, "result": "deleted"}
