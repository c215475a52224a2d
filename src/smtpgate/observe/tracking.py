"""Message tracking: what happened to each message, kept ``tracking.retention_days``.

Every mail event (``observe.events``) becomes a row of ``data_dir/tracking.db``
(node-local SQLite in WAL mode, 0600): the session's facts and verdicts at
acceptance, each recipient's attempts with the remote reply and TLS, the
report sent, and refusals (kept as their own records, "NOQUEUE"). The SMTP
path never waits for it: the subscriber puts events on a bounded in-memory
queue (a full queue drops, counted and logged once a minute at most) and one
writer thread stores them in batches and removes what is older than the
retention. ``smtpgate trace``, ``GET /api/v1/trace`` and the console's
Tracking page read the database with their own connections (:func:`search`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpgate.databases import execute_values, wal
from smtpgate.files import private_file
from smtpgate.observe.events import (
    Client,
    ContentVerdict,
    DeliveryAttempt,
    DsnSent,
    Event,
    MessageAccepted,
    Quarantined,
    Refused,
)
from smtpgate.observe.log import get_logger

log = get_logger("smtpgate.tracking")

DATABASE = "tracking.db"
DAY = 86400.0
MAX_PENDING = 20_000  # events waiting for the writer; beyond, they are dropped
BATCH = 500
GATHER = 0.05  # seconds the writer waits after an event for more to come
EXPIRE_EVERY = 3600.0
MAX_RESULTS = 1000
NOQUEUE = "NOQUEUE"

_SCHEMA = """
create table if not exists events (
    id integer primary key,
    at real not null,
    queue_id text not null,
    kind text not null,
    message_id text not null default '',
    sender text,
    recipients text not null default '',
    client_ip text not null default '',
    data text not null
);
create index if not exists events_queue_id on events (queue_id);
create index if not exists events_at on events (at);
create index if not exists events_message_id on events (message_id) where message_id != '';
create index if not exists events_sender on events (sender) where sender is not null;
"""


def database_path(data_dir: Path) -> Path:
    return data_dir / DATABASE


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if create:
        private_file(path)
    db = sqlite3.connect(
        path if create else f"file:{path}?mode=ro", uri=not create, timeout=5, isolation_level=None
    )
    if create:
        wal(db, synchronous="normal", schema=_SCHEMA)  # each worker opens it
    return db


@functools.cache
def _names(kind: type) -> tuple[str, ...]:
    """A kind of event's field names but ``when``, in order (looked up once)."""
    return tuple(f.name for f in dataclasses.fields(kind) if f.name != "when")


def _facts(event: Event) -> dict[str, Any]:
    """The event's fields as ``dataclasses.asdict`` gives them, without its deep
    copy of every value (only the client is a dataclass within an event), and
    without looking the fields up per event (this runs for every one)."""
    kind: type = type(event)
    facts = {name: getattr(event, name) for name in _names(kind)}
    client = facts.get("client")
    if isinstance(client, Client):
        facts["client"] = {name: getattr(client, name) for name in _names(Client)}
    return facts


# The events a message's history is made of (connections alone are not kept).
STORED = (MessageAccepted, Refused, DeliveryAttempt, DsnSent, ContentVerdict, Quarantined)


def row(event: Event) -> tuple[float, str, str, str, str | None, str, str, str] | None:
    """(at, queue_id, kind, message_id, sender, recipients, client_ip, data);
    None for what is not kept (the writer is given only :data:`STORED` events)."""
    data = json.dumps(_facts(event), separators=(",", ":"))
    if isinstance(event, MessageAccepted):
        rcpts = "\n" + "\n".join(r.lower() for r in event.recipients) + "\n"
        return (
            event.when, event.queue_id, "accepted", event.message_id, event.sender.lower(),
            rcpts, event.client.ip, data,
        )  # fmt: skip
    if isinstance(event, Refused):
        if not event.first:  # a flood of refused connections: summarised, as in the log
            return None
        rcpt = f"\n{event.recipient.lower()}\n" if event.recipient else ""
        sender = event.sender.lower() if event.sender is not None else None
        qid = event.queue_id or NOQUEUE
        return (event.when, qid, "refused", "", sender, rcpt, event.client.ip, data)
    if isinstance(event, DeliveryAttempt):
        rcpt = f"\n{event.recipient.lower()}\n"
        return (event.when, event.queue_id, "attempt", "", None, rcpt, "", data)
    if isinstance(event, DsnSent):
        return (event.when, event.about, "dsn", "", None, "", "", data)
    if isinstance(event, ContentVerdict):
        return (event.when, event.queue_id, "verdict", "", None, "", "", data)
    if isinstance(event, Quarantined):
        rcpts = "\n" + "\n".join(r.lower() for r in event.recipients) + "\n"
        return (
            event.when, event.queue_id, "quarantined", "", event.sender.lower(), rcpts,
            event.client.ip, data,
        )  # fmt: skip
    return None


class TrackingWriter:
    """The subscriber and its writer thread (``start``, ``stop``)."""

    def __init__(self, data_dir: Path, retention_days: Callable[[], float]) -> None:
        self.path = database_path(data_dir)
        self.retention_days = retention_days
        # SimpleQueue: a put is one C call, no lock and condition in Python (it runs
        # for every event); bounded by hand
        self.pending: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self.dropped = 0
        self._dropped_logged = 0.0
        self._thread: threading.Thread | None = None
        _connect(self.path, create=True).close()  # fails at start, not in the thread

    def __call__(self, event: Event) -> None:
        if not isinstance(event, STORED):  # not worth a trip to the writer's thread
            return
        if self.pending.qsize() < MAX_PENDING:
            self.pending.put_nowait(event)
        else:
            self.dropped += 1
            now = time.monotonic()
            if now - self._dropped_logged > 60:
                self._dropped_logged = now
                log.warning("tracking behind, events dropped", dropped=self.dropped)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tracking", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Store what is pending, then end the thread."""
        if self._thread is None:
            return
        self.pending.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        db = _connect(self.path, create=True)
        expired = 0.0
        try:
            while True:
                batch: list[Event | None] = []
                with contextlib.suppress(queue.Empty):
                    batch.append(self.pending.get(timeout=1.0))
                if batch and batch[0] is not None:
                    # let the next events gather: a wake-up per event cost the
                    # event loop the GIL (futex round trips) several times a message
                    time.sleep(GATHER)
                while len(batch) < BATCH:
                    try:
                        batch.append(self.pending.get_nowait())
                    except queue.Empty:
                        break
                events = [e for e in batch if e is not None]
                if events:
                    self._store(db, events)
                if time.monotonic() - expired > EXPIRE_EVERY:
                    expired = time.monotonic()
                    self._expire(db)
                if None in batch:
                    return
        finally:
            db.close()

    def _store(self, db: sqlite3.Connection, events: list[Event]) -> None:
        rows = [r for r in map(row, events) if r is not None]
        try:
            db.execute("begin")
            execute_values(
                db,
                "insert into events (at, queue_id, kind, message_id, sender, recipients,"
                " client_ip, data)",
                rows,
            )
            db.execute("commit")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("rollback")
            self.dropped += len(rows)
            log.error("tracking write failed", error=str(exc), dropped=len(rows))

    def _expire(self, db: sqlite3.Connection) -> None:
        horizon = time.time() - self.retention_days() * DAY
        try:
            gone = db.execute("delete from events where at < ?", (horizon,)).rowcount
        except sqlite3.Error as exc:
            log.error("tracking expiry failed", error=str(exc))
            return
        if gone:
            log.info("tracking records expired", count=gone)


@dataclass(frozen=True)
class Query:
    """What ``trace`` looks for; every part optional, all given parts must match."""

    queue_id: str | None = None
    message_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100


def _where(q: Query) -> tuple[str, list[Any]]:
    clauses, values = ["1=1"], list[Any]()
    if q.queue_id:
        clauses.append("queue_id = ?")
        values.append(q.queue_id)
    if q.message_id:
        mid = q.message_id.strip()
        clauses.append("message_id in (?, ?)")
        values += [mid, mid if mid.startswith("<") else f"<{mid}>"]
    if q.sender is not None:
        clauses.append("sender = ?")
        values.append(q.sender.lower().strip("<>"))
    if q.recipient:
        clauses.append("instr(recipients, ?) > 0")
        values.append(f"\n{q.recipient.lower().strip('<>')}\n")
    if q.since is not None:
        clauses.append("at >= ?")
        values.append(q.since)
    if q.until is not None:
        clauses.append("at <= ?")
        values.append(q.until)
    return " and ".join(clauses), values


def search(data_dir: Path, q: Query) -> list[dict[str, Any]]:
    """The matching messages, newest first: ``{"queue_id", "first", "last",
    "status", "events": [{"at", "kind", ...facts}]}``; a refusal without a
    queue id is a record of its own."""
    path = database_path(data_dir)
    if not path.exists():
        return []
    limit = max(1, min(q.limit, MAX_RESULTS))
    where, values = _where(q)
    with contextlib.closing(_connect(path, create=False)) as db:
        hits = db.execute(
            f"select id, queue_id from events where {where} order by at desc limit ?",  # noqa: S608 - clauses are ours, values bound
            [*values, limit * 20],
        ).fetchall()
        keys: list[tuple[str, int | None]] = []
        for rowid, qid in hits:
            key = (qid, rowid if qid == NOQUEUE else None)
            if key not in keys:
                keys.append(key)
            if len(keys) >= limit:
                break
        return [_record(db, qid, rowid) for qid, rowid in keys]


def _record(db: sqlite3.Connection, queue_id: str, rowid: int | None) -> dict[str, Any]:
    if rowid is not None:
        found = db.execute("select at, kind, data from events where id = ?", (rowid,))
    else:
        found = db.execute(
            "select at, kind, data from events where queue_id = ? order by at, id", (queue_id,)
        )
    events = [{"at": at, "kind": kind, **json.loads(data)} for at, kind, data in found]
    return {
        "queue_id": queue_id,
        "first": events[0]["at"] if events else None,
        "last": events[-1]["at"] if events else None,
        "status": status(events),
        "events": events,
    }


def status(events: list[dict[str, Any]]) -> str:
    """One word for a record: refused, quarantined, queued, deferred, sent,
    bounced or partly (some recipients sent, some bounced)."""
    kinds = {e["kind"] for e in events}
    if "refused" in kinds and "accepted" not in kinds:
        return "refused"
    if "quarantined" in kinds:
        return "quarantined"
    last: dict[str, str] = {}
    for e in events:
        if e["kind"] == "attempt":
            last[e["recipient"]] = e["status"]
    if not last:
        return "queued"
    final = set(last.values())
    if "deferred" in final:
        return "deferred"
    return str(final.pop()) if len(final) == 1 else "partly"


def records_text(records: list[dict[str, Any]]) -> Iterator[str]:
    """``smtpgate trace``'s text: a header line per message, an indented line
    per event."""
    for record in records:
        first = time_text(record["first"])
        yield f"{record['queue_id']}  {record['status']}  {first}"
        for e in record["events"]:
            yield f"  {time_text(e['at'])}  {event_text(e)}"
        yield ""


def time_text(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def event_text(e: dict[str, Any]) -> str:
    kind = e["kind"]
    if kind == "accepted":
        c = e["client"]
        verdicts = ", ".join(f"{k}={v}" for k, v in e.get("verdicts", []))
        return (
            f"accepted from {c['name']}[{c['ip']}] listener={c['listener']}"
            f" profile={c['profile']} tls={c['tls'] or 'none'} size={e['size']}"
            f" from=<{e['sender']}> to={','.join(e['recipients'])}"
            f" message-id={e['message_id'] or '-'}" + (f" verdicts: {verdicts}" if verdicts else "")
        )
    if kind == "refused":
        c = e["client"]
        return (
            f"refused at {e['stage']} from {c['name']}[{c['ip']}]: {e['reply']}"
            f" ({e['reason']}) from=<{e['sender'] or ''}> to=<{e['recipient'] or ''}>"
        )
    if kind == "attempt":
        return (
            f"{e['status']} to=<{e['recipient']}> relay={e['relay']} dsn={e['dsn']}"
            f" tls={e['tls'] or 'none'} connector={e['connector']} ({e['reply']})"
        )
    if kind == "dsn":
        return f"report ({e['action']}) to=<{e['to']}> queued as {e['queue_id']}"
    if kind == "quarantined":
        return f"quarantined: {e['reason']}"
    if kind == "verdict":
        results = ", ".join(f"{scanner}: {action}" for scanner, action in e["results"])
        return f"content {e['action']} ({results or 'no scanner'})"
    return str(kind)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time: ISO 8601 (``2026-11-29T16:00:00Z``, a date alone is its
    midnight UTC), Unix seconds, or an age (``90s``, ``30m``, ``2h``, ``7d``: that
    long ago). ValueError when it is none of these."""
    text = text.strip()
    now = time.time() if now is None else now
    if text[-1:] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * _UNITS[text[-1]]
    with contextlib.suppress(ValueError):
        return float(text)
    from datetime import UTC, datetime  # noqa: PLC0415 - only for this form

    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
