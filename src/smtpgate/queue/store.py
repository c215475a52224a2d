"""The queue's storage: SQLite (WAL, synchronous=FULL) plus files for large bodies.

Rules kept here:

* :meth:`QueueStore.ingest` is the one way a message enters the store: the
  gateway's :class:`~smtpgate.queue.queue.Queue` calls it with a group of
  messages (group commit, through :meth:`QueueStore.write`, which adds the
  outcomes of the moment to the same transaction), the queue tools with
  one. A message is durable once it returns: its row and its recipients are in a committed
  transaction (fsynced by SQLite's WAL at ``synchronous=FULL``), and a large
  body's file was fsynced, and its directory too, before that transaction.
* Per-recipient state (:class:`~smtpgate.queue.states.RecipientState`), plus
  attempts, the last reply and the next attempt. A message whose
  recipients are all delivered or bounced is deleted with its body.
* Times come from the store's :class:`~smtpgate.queue.clock.Clock`.
* Every SQLite failure leaves as :class:`~smtpgate.errors.QueueError`.
* One instance belongs to one thread (sqlite3 connections are not shared);
  the queue tools open their own instance on the same file, which SQLite's
  locking makes safe while the gateway runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from smtpgate.databases import BUSY_TIMEOUT, execute_values, wal, while_locked
from smtpgate.errors import QueueError
from smtpgate.files import private_dir, private_file
from smtpgate.model.envelope import Envelope, MailParams, RcptParams, Recipient
from smtpgate.queue.clock import SYSTEM_CLOCK, Clock
from smtpgate.queue.states import DUE, PENDING, MessageKind, RecipientState
from smtpgate.spool import SpooledBody, fsync_path

P = ParamSpec("P")
R = TypeVar("R")
_SCHEMA = """
create table if not exists messages(
    id text primary key,
    sender text not null,
    arrival real not null,
    size integer not null,
    body blob,
    body_path text,
    meta text not null,
    kind integer not null default 0,
    owner integer not null default 0
);
create table if not exists recipients(
    message_id text not null references messages(id) on delete cascade,
    idx integer not null,
    address text not null,
    params text not null,
    state text not null,
    attempts integer not null default 0,
    next_attempt real not null,
    last_reply text,
    last_attempt real,
    warned integer not null default 0,
    primary key(message_id, idx)
);
create index if not exists recipients_due on recipients(state, next_attempt);
"""


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Turn what SQLite raises into :class:`QueueError`, with SQLite's words."""
    try:
        yield
    except sqlite3.Error as exc:
        raise QueueError(str(exc)) from exc


def _storage(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with storage_errors():
            return method(*args, **kwargs)

    return wrapper


def _reading(method: Callable[P, R]) -> Callable[P, R]:
    """A read: tried again while another process holds a lock it needs (rare
    in WAL mode: a process recovering or removing the log). The store's
    connection has no busy timeout of its own: see :class:`_Transaction`."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with storage_errors():
            return while_locked(lambda: method(*args, **kwargs))

    return wrapper


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


# Outcomes, many recipients per statement (execute_values): UPDATE ... FROM a
# table of values. A recipient may appear once per statement (else which row
# applies is undefined).
_UPDATE_HEAD = (
    "with u(message_id, idx, state, last_reply, next_attempt, attempted, at, warned) as ("
)
_UPDATE_TAIL = (
    ") update recipients set state = u.state,"
    " last_reply = coalesce(u.last_reply, recipients.last_reply),"
    " next_attempt = u.next_attempt, attempts = recipients.attempts + u.attempted,"
    " last_attempt = coalesce(u.at, recipients.last_attempt),"
    " warned = coalesce(u.warned, recipients.warned)"
    " from u where recipients.message_id = u.message_id and recipients.idx = u.idx"
)
PART = 500  # ids per statement: far below SQLite's limit on placeholders


def _parts(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), PART):
        yield ids[start : start + PART]


@dataclass(frozen=True)
class NewMessage:
    envelope: Envelope
    body: SpooledBody
    kind: MessageKind = MessageKind.MAIL


@dataclass
class QueuedRecipient:
    idx: int
    address: str
    params: RcptParams
    state: RecipientState
    attempts: int
    next_attempt: float
    last_reply: str | None
    last_attempt: float | None
    warned: bool


@dataclass
class QueuedMessage:
    id: str
    sender: str
    arrival: float
    size: int
    meta: dict[str, Any]
    kind: MessageKind
    recipients: list[QueuedRecipient] = field(default_factory=list)

    @property
    def mail_params(self) -> MailParams:
        return MailParams.from_dict(self.meta.get("params", {}))


# Messages being attempted already, as a JSON array: SQLite makes one
# ephemeral index of it, whatever its length.
_NOT_IN = " and r.message_id not in (select value from json_each(?))"


@dataclass(frozen=True)
class Fresh:
    """A message just made durable, as delivery would read it back: the
    message and its body (bytes, or the file of a large one)."""

    message: QueuedMessage
    body: bytes | Path


@dataclass(frozen=True)
class Written:
    """What :meth:`QueueStore.write` did: the new messages as :class:`Fresh`,
    or why they were refused (the outcomes were recorded either way)."""

    fresh: list[Fresh]
    refused: OSError | None


@dataclass(frozen=True)
class RecipientUpdate:
    message_id: str
    idx: int
    state: RecipientState
    last_reply: str | None
    next_attempt: float
    attempted: bool = True
    warned: bool | None = None


def _meta(envelope: Envelope) -> str:
    return json.dumps(
        {
            "params": envelope.mail_params.as_dict(),
            "helo": envelope.helo,
            "client_ip": envelope.client_ip,
            "tls": envelope.tls,
            "auth_user": envelope.auth_user,
            "profile": envelope.profile,
            "spam_check": envelope.spam_check,
        }
    )


def _params(recipient: Recipient) -> str:
    return json.dumps(recipient.params.as_dict())


@dataclass(frozen=True)
class Owner:
    """Which worker of how many this store serves (``smtpgate serve`` with
    ``gateway.workers``). The workers share one database; a message belongs to
    the worker that queued it, which delivers it and keeps its body file in a
    directory of its own. A message whose worker no longer exists (fewer
    workers than before) is delivered by worker ``owner % count``."""

    index: int = 0
    count: int = 1

    @property
    def body_dir(self) -> str:
        """The body files' sub-directory: "" for worker 0 (the layout of one process)."""
        return f"w{self.index}" if self.index else ""


ONE = Owner()


class QueueStore:
    """The queue database of one data directory."""

    @_storage
    def __init__(self, directory: Path, clock: Clock = SYSTEM_CLOCK, owner: Owner = ONE) -> None:
        self.directory = directory
        self.clock = clock
        self.owner = owner
        self.bodies = directory / "bodies"
        private_dir(directory)
        private_dir(self.bodies)
        self.own_bodies = private_dir(self.bodies / owner.body_dir) if owner.index else self.bodies
        database = private_file(directory / "queue.db")  # its -wal and -shm copy the mode
        self.db = sqlite3.connect(database, isolation_level=None, timeout=BUSY_TIMEOUT)
        self.db.execute("pragma foreign_keys=on")
        wal(self.db, schema=_SCHEMA)  # workers and tools may open a new queue together
        self._migrate()
        # from now on, no busy timeout: writes and reads try again themselves
        # (_Transaction, _reading), with shorter pauses than SQLite's handler
        self.db.execute("pragma busy_timeout = 0")

    def _migrate(self) -> None:
        """Add what later versions added to a queue made by an earlier one."""
        columns = {row[1] for row in self.db.execute("pragma table_info(messages)")}
        if "owner" not in columns:
            with self._transaction():
                columns = {row[1] for row in self.db.execute("pragma table_info(messages)")}
                if "owner" not in columns:  # another worker may have been first
                    self.db.execute(
                        "alter table messages add column owner integer not null default 0"
                    )

    def _mine(self, alias: str = "") -> tuple[str, tuple[int, ...]]:
        """The SQL condition (and its arguments) for this worker's messages."""
        if self.owner.count == 1:
            return "", ()
        return f" and {alias}owner % ? = ?", (self.owner.count, self.owner.index)

    @_storage
    def close(self) -> None:
        self.db.close()

    # -- ingest ------------------------------------------------------------------

    @_storage
    def ingest(self, batch: Sequence[NewMessage]) -> list[Fresh]:
        """Make every message of ``batch`` durable, all in one transaction; the
        only way into the queue. Returns each message as :meth:`get` and
        :meth:`body` would read it back (for the hand-off to delivery). Raises
        OSError (bodies) or QueueError."""
        written = self.write(batch, ())
        if written.refused is not None:
            raise written.refused
        return written.fresh

    @_storage
    def write(self, batch: Sequence[NewMessage], updates: Sequence[RecipientUpdate]) -> Written:
        """:meth:`ingest` and :meth:`apply` in one transaction (one fsync), for
        the gateway's group commit. If the large bodies cannot be written, the
        outcomes are still recorded and only the new messages fail
        (``Written.refused``). Raises QueueError if the transaction fails."""
        try:
            spilled = self._spill(batch)
        except OSError as exc:
            self.apply(updates)
            return Written([], exc)
        now = self.clock.now()
        with self._transaction():
            fresh = self._insert(batch, now, spilled)
            self._update(updates, now)
        return Written(fresh, None)

    def _spill(self, batch: Sequence[NewMessage]) -> set[str]:
        """Large bodies to their files, fsynced with their directory, before the
        transaction that refers to them; the ids of those messages."""
        spilled = {m.body.queue_id for m in batch if m.body.path is not None}
        for item in batch:
            if item.body.queue_id in spilled:
                item.body.save_as(self.own_bodies / item.body.queue_id, fsync=True)
        if spilled:
            fsync_path(self.own_bodies)
        return spilled

    def _insert(self, batch: Sequence[NewMessage], now: float, spilled: set[str]) -> list[Fresh]:
        """The rows of ``batch``: two statements for the whole group (each
        statement gives the GIL away and back, a thread switch when the event
        loop wants it); the messages as :meth:`get` would read them back."""
        rows, recipients, fresh = [], [], []
        for item in batch:
            envelope, body = item.envelope, item.body
            in_file = body.queue_id in spilled
            blob = None if in_file else b"".join(body.chunks())
            path = str(Path(self.owner.body_dir, body.queue_id)) if in_file else None
            meta = _meta(envelope)
            params = [_params(r) for r in envelope.recipients]
            rows.append(
                (body.queue_id, envelope.sender, now, body.size, blob, path, meta, item.kind,
                 self.owner.index)
            )  # fmt: skip
            recipients += [
                (body.queue_id, i, r.address, params[i], RecipientState.QUEUED, now)
                for i, r in enumerate(envelope.recipients)
            ]
            message = QueuedMessage(
                body.queue_id, envelope.sender, now, body.size, json.loads(meta), item.kind
            )
            message.recipients = [
                QueuedRecipient(
                    i, r.address, RcptParams.from_dict(json.loads(params[i])),
                    RecipientState.QUEUED, 0, now, None, None, False,
                )
                for i, r in enumerate(envelope.recipients)
            ]  # fmt: skip
            fresh.append(Fresh(message, blob if blob is not None else self.bodies / str(path)))
        execute_values(
            self.db,
            "insert into messages(id, sender, arrival, size, body, body_path, meta, kind, owner)",
            rows,
        )
        execute_values(
            self.db,
            "insert into recipients(message_id, idx, address, params, state, next_attempt)",
            recipients,
        )
        return fresh

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)

    # -- reading -----------------------------------------------------------------

    @_reading
    def due(self, now: float, exclude: Collection[str], limit: int = 500) -> list[QueuedMessage]:
        """This worker's messages with recipients whose next attempt has come,
        but for those in ``exclude`` (being attempted already)."""
        mine, args = self._mine("m.")
        rows = self.db.execute(
            "select distinct r.message_id from recipients r join messages m on m.id = r.message_id "  # noqa: S608 - placeholders only
            f"where r.state in ({_marks(DUE)}) and r.next_attempt <= ?{mine}{_NOT_IN} "
            "order by r.next_attempt limit ?",
            (*DUE, now, *args, json.dumps(sorted(exclude)), limit),
        ).fetchall()
        return [m for m in (self.get(r[0]) for r in rows) if m is not None]

    @_storage
    def due_and_next(
        self, now: float, exclude: Collection[str], limit: int = 500
    ) -> tuple[list[QueuedMessage], float | None]:
        """``due`` and ``next_due`` in one call: one trip to the queue's thread."""
        return self.due(now, exclude, limit), self.next_due(exclude)

    @_reading
    def next_due(self, exclude: Collection[str] = ()) -> float | None:
        """When the next attempt of a message not in ``exclude`` is due."""
        mine, args = self._mine("m.")
        row = self.db.execute(
            "select min(r.next_attempt) from recipients r join messages m on m.id = r.message_id "  # noqa: S608 - placeholders only
            f"where r.state in ({_marks(DUE)}){mine}{_NOT_IN}",
            (*DUE, *args, json.dumps(sorted(exclude))),
        ).fetchone()
        return row[0] if row else None

    @_reading
    def get(self, message_id: str) -> QueuedMessage | None:
        row = self.db.execute(
            "select id, sender, arrival, size, meta, kind from messages where id = ?",
            (message_id,),
        ).fetchone()
        if row is None:
            return None
        message = QueuedMessage(
            row[0], row[1], row[2], row[3], json.loads(row[4]), MessageKind(row[5])
        )
        for r in self.db.execute(
            "select idx, address, params, state, attempts, next_attempt, last_reply, "
            "last_attempt, warned from recipients where message_id = ? order by idx",
            (message_id,),
        ):
            message.recipients.append(
                QueuedRecipient(
                    r[0],
                    r[1],
                    RcptParams.from_dict(json.loads(r[2])),
                    RecipientState(r[3]),
                    r[4],
                    r[5],
                    r[6],
                    r[7],
                    bool(r[8]),
                )
            )
        return message

    @_reading
    def body(self, message_id: str) -> bytes | Path | None:
        row = self.db.execute(
            "select body, body_path from messages where id = ?", (message_id,)
        ).fetchone()
        if row is None:
            return None
        return bytes(row[0]) if row[0] is not None else self.bodies / row[1]

    # -- outcomes ----------------------------------------------------------------

    @_storage
    def apply(self, updates: Sequence[RecipientUpdate]) -> list[str]:
        """Record attempt outcomes; delete and return messages with nothing left to do."""
        if not updates:
            return []
        now = self.clock.now()
        with self._transaction():
            return self._update(updates, now)

    def _update(self, updates: Sequence[RecipientUpdate], now: float) -> list[str]:
        """:meth:`apply`'s work, inside the caller's transaction: a statement per
        kind of work for the whole group, not per message."""
        if not updates:
            return []
        rows = [
            (
                u.message_id, u.idx, u.state, u.last_reply, u.next_attempt, int(u.attempted),
                now if u.attempted else None, None if u.warned is None else int(u.warned),
            )
            for u in updates
        ]  # fmt: skip
        if len({(u.message_id, u.idx) for u in updates}) == len(updates):
            execute_values(self.db, _UPDATE_HEAD, rows, tail=_UPDATE_TAIL)
        else:  # one recipient twice: in order, the later outcome last
            for one in rows:
                execute_values(self.db, _UPDATE_HEAD, [one], tail=_UPDATE_TAIL)
        return self._finish(list(dict.fromkeys(u.message_id for u in updates)))

    def _finish(self, message_ids: Sequence[str]) -> list[str]:
        """Delete those of these messages with no recipient left to try (their
        recipients go with them: ``on delete cascade``) and their body files;
        the ids deleted, in the order given. One statement per
        :data:`PART` messages: it checks, deletes and says what it deleted."""
        finished: list[str] = []
        for part in _parts(message_ids):
            query = (
                f"delete from messages where id in ({_marks(part)}) and not exists "  # noqa: S608 - placeholders only
                "(select 1 from recipients r where r.message_id = messages.id "
                f"and r.state in ({_marks(PENDING)})) returning id, body_path"
            )
            gone = set(self._drop(query, (*part, *PENDING)))
            finished += [m for m in part if m in gone]
        return finished

    def _drop(self, query: str, args: Sequence[object]) -> list[str]:
        """Run ``query``, a ``delete from messages … returning id, body_path``
        (the recipients go with their messages: ``on delete cascade``), and
        remove the deleted messages' body files; the ids deleted."""
        gone = self.db.execute(query, args).fetchall()
        for _, path in gone:
            if path:
                (self.bodies / path).unlink(missing_ok=True)
        return [message_id for message_id, _ in gone]

    # -- administration ------------------------------------------------------------

    def list(self, filters: Filters) -> Iterator[QueuedMessage]:
        with storage_errors():  # a generator: the decorator would not see its errors
            clauses, args = filters.where(self.clock.now())
            query = (
                f"select distinct m.id from messages m join recipients r on r.message_id = m.id "  # noqa: S608 - clauses are fixed strings; values are parameters
                f"{'where ' + ' and '.join(clauses) if clauses else ''} order by m.arrival"
            )
            found = while_locked(lambda: self.db.execute(query, args).fetchall())
            for (message_id,) in found:
                message = self.get(message_id)
                if message is not None:
                    yield message

    @_storage
    def set_state(
        self, message_id: str | None, states: Sequence[RecipientState], new: RecipientState
    ) -> int:
        """Move pending recipients (of one message, or all) to ``new`` (due now)."""
        where = f"state in ({_marks(states)})" + (" and message_id = ?" if message_id else "")
        args = (*states, *((message_id,) if message_id else ()))
        with self._transaction():
            cursor = self.db.execute(
                f"update recipients set state = ?, next_attempt = ? where {where}",  # noqa: S608 - placeholders only
                (new, self.clock.now(), *args),
            )
        return cursor.rowcount

    @_storage
    def delete(self, message_id: str) -> bool:
        with self._transaction():
            query = "delete from messages where id = ? returning id, body_path"
            return bool(self._drop(query, (message_id,)))

    @_reading
    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("select state, count(*) from recipients group by state"))

    @_reading
    def oldest_arrival(self) -> float | None:
        row = self.db.execute("select min(arrival) from messages").fetchone()
        return row[0] if row else None


@dataclass(frozen=True)
class Filters:
    """``smtpgate queue list`` filters; all optional."""

    state: RecipientState | None = None
    sender: str | None = None
    recipient: str | None = None
    domain: str | None = None
    older_than: float | None = None  # seconds

    def where(self, now: float) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if self.state:
            clauses.append("r.state = ?")
            args.append(self.state)
        if self.sender is not None:
            clauses.append("lower(m.sender) = lower(?)")
            args.append(self.sender)
        if self.recipient:
            clauses.append("lower(r.address) = lower(?)")
            args.append(self.recipient)
        if self.domain:
            clauses.append("lower(r.address) like ?")
            args.append("%@" + self.domain.lower())
        if self.older_than is not None:
            clauses.append("m.arrival <= ?")
            args.append(now - self.older_than)
        return clauses, args


class _Transaction:
    """A write transaction, its lock taken at ``BEGIN IMMEDIATE``.

    Worker processes share the database, so the write lock is often held by
    another one for the length of its commit (an fsync, about a millisecond).
    SQLite's own busy handler sleeps 1, 2, 5, 10 ms ... between tries, which
    made two workers slower than one; here the lock is tried again after
    0.1 ms, growing to 2 ms, for up to :data:`BUSY_TIMEOUT` seconds.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        # the connection's busy timeout is 0 (set once: toggling it here cost
        # two statements, two thread switches, per transaction)
        while_locked(lambda: self.db.execute("begin immediate"))

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self.db.execute("commit" if kind is None else "rollback")


def clean_orphan_bodies(store: QueueStore) -> int:
    """Body files no message refers to (a crash between fsync and commit), in
    this worker's own directory only: another worker may be committing. Only
    for the gateway at start-up: a tool running beside it could remove a body
    whose message is being committed."""
    with storage_errors():
        rows = while_locked(
            lambda: store.db.execute(
                "select body_path from messages where body_path is not null"
            ).fetchall()
        )
        known = {r[0] for r in rows}
    removed = 0
    for path in store.own_bodies.iterdir():
        if path.is_file() and str(path.relative_to(store.bodies)) not in known:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
