"""The configuration store: applied revisions, one draft, the audit log, API tokens.

Backed by SQLAlchemy so that the SQLite file in ``data_dir`` (the default)
can be replaced by PostgreSQL for peer gateways without touching callers.
Documents are stored in normal form (``smtpgate.config.document``) as JSON;
their secrets are ``enc:v1:`` tokens, never clear text.

Rules the store keeps:

* revisions are only ever appended; the applied revision is the newest;
* there is at most one draft, and it records the revision it started from
  and a version number that every write increases (so two editors cannot
  overwrite each other: a write names the version it read);
* every change is one transaction, and writes take the database lock first
  (``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL a transaction-level advisory
  lock, ``pg_advisory_xact_lock``, taken as the transaction's first statement),
  so a read-modify-write cannot interleave;
* on PostgreSQL, adding a revision also notifies ``REVISION_CHANNEL`` with the
  revision number, in the same transaction (so peers hear of it only once it is
  committed); ``smtpgate.config.watch`` listens for it. SQLite has no such
  channel: nodes poll.

The store is chosen by URL (``gateway.store``): empty means SQLite in
``data_dir/config.db``. ``smtpgate serve`` records a non-default URL in
``data_dir/store.json`` so that the API process and the CLI, which only know
the data directory, open the same store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from smtpgate.config.document import Document
from smtpgate.config.schema import GatewaySettings, store_url_problem
from smtpgate.config.validate import private_file_problem
from smtpgate.databases import wal
from smtpgate.errors import AdminError, ConfigError, FieldProblem
from smtpgate.files import private_file

# Text rather than VARCHAR(n) for names and actors: SQLite never enforced the
# lengths and PostgreSQL would, so both engines accept the same values.
metadata = MetaData()
revisions = Table(
    "revisions",
    metadata,
    Column("number", Integer, primary_key=True),
    Column("document", Text, nullable=False),
    Column("applied_at", Float, nullable=False),
    Column("applied_by", Text, nullable=False),
    Column("comment", Text, nullable=False, default=""),
)
drafts = Table(
    "draft",
    metadata,
    Column("id", Integer, primary_key=True),  # always 1: at most one draft
    Column("document", Text, nullable=False),
    Column("base_revision", Integer),
    Column("version", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", Text, nullable=False),
)
audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("detail", Text, nullable=False, default=""),
)
tokens = Table(
    "api_tokens",
    metadata,
    Column("name", Text, primary_key=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", Text, nullable=False),
)
users = Table(  # the console's administrators; passwords as argon2id hashes
    "admin_users",
    metadata,
    Column("name", Text, primary_key=True),
    Column("password_hash", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", Text, nullable=False),
)
settings = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)


@dataclass(frozen=True)
class Revision:
    number: int
    document: Document
    applied_at: float
    applied_by: str
    comment: str

    def summary(self) -> dict[str, Any]:
        """One line of ``config history``."""
        return {
            "revision": self.number,
            "applied_at": self.applied_at,
            "applied_by": self.applied_by,
            "comment": self.comment,
        }


@dataclass(frozen=True)
class Draft:
    document: Document
    base_revision: int | None
    version: int
    updated_at: float
    updated_by: str


@dataclass(frozen=True)
class AuditEntry:
    at: float
    actor: str
    action: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "actor": self.actor, "action": self.action, "detail": self.detail}


class StaleDraft(Exception):  # noqa: N818 - a condition the caller reports, not a bug
    """The draft changed since the caller read it."""


def store_path(data_dir: Path) -> Path:
    return data_dir / "config.db"


def sqlite_engine(path: Path) -> Engine:
    """An engine whose transactions take SQLite's write lock at BEGIN."""
    private_file(path)  # before SQLite opens it: its -wal and -shm copy the mode
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        dbapi_connection.execute("PRAGMA busy_timeout=10000")
        wal(dbapi_connection)  # the CLI, the API and every worker open it

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        immediate = connection.info.get("immediate")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


# One advisory lock key for every write to the store (any constant; "smtpgate").
WRITE_LOCK = 0x736D7470676174
# The PostgreSQL channel on which an added revision is announced (payload: its number).
REVISION_CHANNEL = "smtpgate_revision"


def postgresql_engine(url: URL) -> Engine:
    """An engine whose write transactions first take the store's advisory lock."""
    if "connect_timeout" not in url.query:  # libpq would wait for the network's own timeout
        url = url.update_query_dict({"connect_timeout": "10"})
    engine = create_engine(url.set(drivername="postgresql+psycopg"), pool_pre_ping=True)

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if connection.info.get("immediate"):
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    return engine


def masked(url: str | URL) -> str:
    """The URL as it may be shown: any password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a URL>"


def store_locator(data_dir: Path) -> Path:
    return data_dir / "store.json"


def record_location(data_dir: Path, url: str, password_file: Path | None) -> None:
    """Tell the processes that only know ``data_dir`` where the store is (the
    default SQLite store needs no note: a stale one is removed)."""
    locator = store_locator(data_dir)
    if not url:
        locator.unlink(missing_ok=True)
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    note = {"url": url, "password_file": str(password_file) if password_file else None}
    temporary = locator.with_suffix(".tmp")
    private_file(temporary)
    temporary.write_text(json.dumps(note))
    temporary.replace(locator)


def store_exists(data_dir: Path) -> bool:
    """Whether ``data_dir`` has a configuration store (its SQLite file, or a
    note naming another database)."""
    return store_path(data_dir).exists() or store_locator(data_dir).exists()


def _located(data_dir: Path) -> tuple[str, Path | None]:
    try:
        note = json.loads(store_locator(data_dir).read_text())
    except FileNotFoundError:
        return "", None
    except (OSError, ValueError) as exc:
        raise AdminError(f"{store_locator(data_dir)}: unreadable ({exc})") from None
    password_file = note.get("password_file")
    return str(note.get("url", "")), Path(password_file) if password_file else None


def _store_url(url: str, password_file: Path | None) -> URL:
    """The URL with the password from ``password_file`` (checked to be 0600)."""
    problem = store_url_problem(url)
    if problem:
        raise ConfigError([FieldProblem("gateway.store", problem)])
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError([FieldProblem("gateway.store", f"{masked(url)}: {exc}")]) from None
    if password_file is not None:
        problem = private_file_problem(password_file)
        if problem:
            raise ConfigError([FieldProblem("gateway.store_password_file", problem)])
        parsed = parsed.set(password=password_file.read_text().rstrip("\r\n"))
    return parsed


class ConfigStore:
    """Revisions, draft, audit log and tokens in one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        try:
            with self.transaction() as connection:  # PostgreSQL: two processes may start at once
                metadata.create_all(connection)
        except DBAPIError as exc:
            engine.dispose()
            raise AdminError(
                f"configuration store unreachable: {masked(engine.url)}: {_reason(exc, engine)}"
            ) from None

    @classmethod
    def open(
        cls, data_dir: Path, url: str | None = None, password_file: Path | None = None
    ) -> ConfigStore:
        """The store ``url`` names; ``None``: the one ``serve`` noted in ``data_dir``,
        else SQLite in ``data_dir/config.db`` (also what ``""`` means)."""
        if url is None:
            url, password_file = _located(data_dir)
        if not url:
            return cls(sqlite_engine(store_path(data_dir)))  # 0600: the audit log is private too
        parsed = _store_url(url, password_file)
        if parsed.get_backend_name() == "sqlite":
            if not parsed.database:
                raise ConfigError([FieldProblem("gateway.store", "sqlite:/// needs a file name")])
            return cls(sqlite_engine(Path(parsed.database)))
        return cls(postgresql_engine(parsed))

    @classmethod
    def open_configured(cls, gateway: GatewaySettings) -> ConfigStore:
        """The store ``gateway.store`` names (what ``smtpgate serve`` opens), noted
        in the data directory for the processes that only know that directory."""
        store = cls.open(gateway.data_dir, gateway.store, gateway.store_password_file)
        record_location(gateway.data_dir, gateway.store, gateway.store_password_file)
        return store

    @classmethod
    def open_for(cls, gateway: GatewaySettings) -> ConfigStore:
        """The store of ``gateway.data_dir`` as ``serve`` noted it; before the first
        ``serve``, the one ``gateway.store`` names (what the CLI given ``--config`` uses)."""
        if store_locator(gateway.data_dir).exists():
            return cls.open(gateway.data_dir)
        return cls.open(gateway.data_dir, gateway.store, gateway.store_password_file)

    def close(self) -> None:
        self.engine.dispose()

    def listen_parameters(self) -> dict[str, Any] | None:
        """Keyword arguments for ``psycopg.connect`` reaching this store's PostgreSQL
        database as the store does (same URL, password, ``connect_timeout``), for a
        connection that LISTENs on ``REVISION_CHANNEL``; ``None`` on SQLite. They
        hold the password: never log them (``masked(store.engine.url)`` may be)."""
        if self.engine.dialect.name != "postgresql":
            return None
        _args, parameters = self.engine.dialect.create_connect_args(self.engine.url)
        parameters.pop("context", None)  # SQLAlchemy's own type adapters
        return dict(parameters)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction, holding the write lock from its start."""
        with self.engine.connect() as connection:
            connection.info["immediate"] = True
            try:
                with connection.begin():
                    yield connection
            finally:
                connection.info.pop("immediate", None)

    # -- revisions -------------------------------------------------------------

    def applied(self, connection: Connection | None = None) -> Revision | None:
        query = select(revisions).order_by(revisions.c.number.desc()).limit(1)
        row = self._one(query, connection)
        return _revision(row) if row else None

    def applied_document(self) -> Document | None:
        revision = self.applied()
        return revision.document if revision else None

    def applied_number(self) -> int | None:
        query = select(revisions.c.number).order_by(revisions.c.number.desc()).limit(1)
        row = self._one(query, None)
        return int(row[0]) if row else None

    def revision(self, number: int) -> Revision | None:
        row = self._one(select(revisions).where(revisions.c.number == number), None)
        return _revision(row) if row else None

    def history(self) -> list[Revision]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(revisions).order_by(revisions.c.number.desc()))
            return [_revision(row) for row in rows]

    def add_revision(
        self, connection: Connection, document: Document, actor: str, comment: str
    ) -> int:
        current = self.applied(connection)
        number = (current.number if current else 0) + 1
        connection.execute(
            insert(revisions).values(
                number=number,
                document=json.dumps(document),
                applied_at=time.time(),
                applied_by=actor,
                comment=comment,
            )
        )
        if connection.dialect.name == "postgresql":  # delivered on commit, never before
            connection.execute(
                text("SELECT pg_notify(:channel, :number)"),
                {"channel": REVISION_CHANNEL, "number": str(number)},
            )
        return number

    # -- the draft -------------------------------------------------------------

    def draft(self, connection: Connection | None = None) -> Draft | None:
        row = self._one(select(drafts).where(drafts.c.id == 1), connection)
        if row is None:
            return None
        return Draft(
            json.loads(row.document),
            row.base_revision,
            row.version,
            row.updated_at,
            row.updated_by,
        )

    def save_draft(  # noqa: PLR0913 - what a draft write needs to know
        self,
        connection: Connection,
        document: Document,
        actor: str,
        *,
        base_revision: int | None,
        expected_version: int | None = None,
        rebase: bool = False,
    ) -> int:
        """Write the draft; ``expected_version`` guards against lost updates. A new
        draft starts from ``base_revision``; ``rebase`` moves an existing one there
        (its whole document was replaced)."""
        current = self.draft(connection)
        if expected_version is not None and (
            current is None or current.version != expected_version
        ):
            raise StaleDraft
        version = (current.version if current else 0) + 1
        values = {
            "document": json.dumps(document),
            "version": version,
            "updated_at": time.time(),
            "updated_by": actor,
        }
        if current is None:
            connection.execute(insert(drafts).values(id=1, base_revision=base_revision, **values))
        else:
            if rebase:
                values["base_revision"] = base_revision
            connection.execute(update(drafts).where(drafts.c.id == 1).values(**values))
        return version

    def drop_draft(self, connection: Connection) -> bool:
        return connection.execute(delete(drafts).where(drafts.c.id == 1)).rowcount > 0

    # -- audit log and meta ----------------------------------------------------

    def record(self, connection: Connection, actor: str, action: str, detail: str = "") -> None:
        connection.execute(
            insert(audit).values(at=time.time(), actor=actor, action=action, detail=detail)
        )

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        query = select(audit).order_by(audit.c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [
                AuditEntry(r.at, r.actor, r.action, r.detail) for r in connection.execute(query)
            ]

    def meta(self, key: str) -> str | None:
        row = self._one(select(settings.c.value).where(settings.c.key == key), None)
        return str(row[0]) if row else None

    def metas(self, prefix: str) -> dict[str, str]:
        """Every meta entry whose key starts with ``prefix``."""
        query = select(settings.c.key, settings.c.value).where(
            settings.c.key.startswith(prefix, autoescape=True)
        )
        with self.engine.connect() as connection:
            return {str(r.key): str(r.value) for r in connection.execute(query)}

    def delete_meta(self, connection: Connection, key: str) -> None:
        connection.execute(delete(settings).where(settings.c.key == key))

    def set_meta(self, connection: Connection, key: str, value: str) -> None:
        connection.execute(delete(settings).where(settings.c.key == key))
        connection.execute(insert(settings).values(key=key, value=value))

    # -- API tokens ----------------------------------------------------------------

    def add_token(self, connection: Connection, name: str, token_digest: str, actor: str) -> bool:
        exists = connection.execute(select(tokens.c.name).where(tokens.c.name == name)).first()
        if exists:
            return False
        connection.execute(
            insert(tokens).values(
                name=name, digest=token_digest, created_at=time.time(), created_by=actor
            )
        )
        return True

    def token_name(self, token_digest: str) -> str | None:
        row = self._one(select(tokens.c.name).where(tokens.c.digest == token_digest), None)
        return str(row[0]) if row else None

    def token_list(self) -> list[tuple[str, float, str]]:
        query = select(tokens.c.name, tokens.c.created_at, tokens.c.created_by)
        with self.engine.connect() as connection:
            return [(r[0], r[1], r[2]) for r in connection.execute(query.order_by(tokens.c.name))]

    def remove_token(self, connection: Connection, name: str) -> bool:
        return connection.execute(delete(tokens).where(tokens.c.name == name)).rowcount > 0

    # -- console accounts ------------------------------------------------------------

    def add_user(
        self, connection: Connection, name: str, password_hash: str, role: str, actor: str
    ) -> bool:
        exists = connection.execute(select(users.c.name).where(users.c.name == name)).first()
        if exists:
            return False
        connection.execute(
            insert(users).values(
                name=name,
                password_hash=password_hash,
                role=role,
                created_at=time.time(),
                created_by=actor,
            )
        )
        return True

    def update_user(self, connection: Connection, name: str, **values: str) -> bool:
        changed = connection.execute(update(users).where(users.c.name == name).values(**values))
        return changed.rowcount > 0

    def remove_user(self, connection: Connection, name: str) -> bool:
        return connection.execute(delete(users).where(users.c.name == name)).rowcount > 0

    def user(self, name: str) -> tuple[str, str, str] | None:
        """(name, password hash, role) of a console user."""
        query = select(users.c.name, users.c.password_hash, users.c.role)
        row = self._one(query.where(users.c.name == name), None)
        return (str(row[0]), str(row[1]), str(row[2])) if row else None

    def user_list(self) -> list[tuple[str, str, float, str]]:
        query = select(users.c.name, users.c.role, users.c.created_at, users.c.created_by)
        with self.engine.connect() as connection:
            return [
                (r[0], r[1], r[2], r[3]) for r in connection.execute(query.order_by(users.c.name))
            ]

    # -- helpers -------------------------------------------------------------------

    def _one(self, query: Any, connection: Connection | None) -> Any:
        if connection is not None:
            return connection.execute(query).first()
        with self.engine.connect() as fresh:
            return fresh.execute(query).first()


def _reason(exc: DBAPIError, engine: Engine) -> str:
    """The driver's one-line reason, never the password."""
    reason = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else ""
    password = engine.url.password
    if password:
        reason = reason.replace(str(password), "***")
    return reason or type(exc.orig or exc).__name__


def _revision(row: Any) -> Revision:
    return Revision(
        row.number, json.loads(row.document), row.applied_at, row.applied_by, row.comment
    )
