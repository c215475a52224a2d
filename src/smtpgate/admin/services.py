"""Configuration use cases shared by the REST API and the CLI.

The lifecycle: every edit changes only the *draft* (created from the applied
revision on the first edit); ``diff`` compares the draft with the applied
revision; ``validate`` runs every check ``smtpgate config check`` runs, plus
opening the certificates and decrypting the secrets; ``apply`` validates,
appends the draft as the next revision and drops the draft. A running
gateway notices the new revision and swaps its snapshot.

A draft is never dropped silently: ``import`` and ``rollback`` refuse to
replace one unless asked to (``force``), and a stale editor (one that read an
older draft version) is refused rather than overwriting someone else's work.
Every change is written to the audit log with who made it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection

from smtpgate.admin import nodes
from smtpgate.config.document import (
    LOCAL,
    Change,
    Document,
    diff,
    digest,
    local_changes,
    local_part,
    merge,
    normalise,
    restart_required,
    shared_part,
    to_document,
    to_yaml,
)
from smtpgate.config.load import from_pydantic, parse_config
from smtpgate.config.schema import GatewayConfig
from smtpgate.config.store import ConfigStore, Draft, Revision, StaleDraft
from smtpgate.config.validate import name_objects
from smtpgate.errors import ConfigError, Conflict, FieldProblem, NotFound
from smtpgate.snapshot import Snapshot
from smtpgate.tls.certificates import check_configured


@dataclass(frozen=True)
class ApplyResult:
    revision: int
    changes: list[Change]
    restart_required: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "changes": [c.as_dict() for c in self.changes],
            "restart_required": self.restart_required,
        }


@dataclass
class ConfigService:
    """The configuration lifecycle over one store, as seen from one node.

    The store holds the shared settings only; this node's ``local`` settings
    (``smtpgate.config.document.LOCAL``: from its configuration file, as
    ``serve`` noted them in ``data_dir``) complete every document shown,
    checked and applied here. An edit can never change them."""

    store: ConfigStore
    data_dir: Path
    local: Document = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.local:
            self.local = nodes.known_local(self.data_dir)

    @property
    def node(self) -> str:
        name: str = normalise(self.local)["gateway"]["node"]
        return name

    def whole(self, shared: Document) -> Document:
        """This node's whole document for a stored one (revisions from before the
        split may still hold another node's local keys: this node's win)."""
        return merge(shared_part(shared), self.local)

    # -- reading ---------------------------------------------------------------

    def applied(self) -> Revision:
        revision = self.store.applied()
        if revision is None:
            raise NotFound("the store has no applied configuration yet (import one)")
        return dataclasses.replace(revision, document=self.whole(revision.document))

    def draft(self) -> Draft | None:
        draft = self.store.draft()
        if draft is None:
            return None
        return dataclasses.replace(draft, document=self.whole(draft.document))

    def working(self) -> tuple[Document, int | None]:
        """The draft's document and version, or the applied document (version None)."""
        draft = self.draft()
        if draft is not None:
            return draft.document, draft.version
        return self.applied().document, None

    def view(self, which: str) -> Document:
        if which == "draft":
            return self.working()[0]
        if which == "applied":
            return self.applied().document
        number = int(which)
        revision = self.store.revision(number)
        if revision is None:
            raise NotFound(f"no revision {number}")
        return self.whole(revision.document)

    def export(self, which: str, *, redact: bool = False) -> str:
        """``which`` (applied, draft or a revision number) as YAML for people."""
        return to_yaml(self.view(which), redact=redact)

    def diff(self) -> list[Change]:
        draft = self.store.draft()
        if draft is None:
            return []
        applied = self.store.applied()
        return diff(self.whole(applied.document) if applied else {}, self.whole(draft.document))

    def history(self) -> list[Revision]:
        return self.store.history()

    def diff_report(self) -> dict[str, Any]:
        """What ``config diff`` shows: every change, and those that need a restart."""
        changes = self.diff()
        return {
            "changes": [c.as_dict() for c in changes],
            "restart_required": restart_required(changes),
        }

    # -- editing the draft -----------------------------------------------------

    def edit(
        self,
        change: Callable[[Document], Document],
        actor: str,
        what: str,
        expected_version: int | None = None,
        *,
        rebase: bool = False,
    ) -> Draft:
        """Apply ``change`` to the draft (or a new draft from the applied revision);
        the result must pass every configuration check and keep this node's local
        settings (a local key left out keeps its value; a ``rebase``, the whole
        draft replaced by an import or a rollback, takes this node's). The audit
        log records what changed, field by field, as ``config diff`` says it; a
        ``rebase`` also says ``what`` it was."""
        with self.store.transaction() as connection:
            current = self.store.draft(connection)
            applied = self.store.applied(connection)
            if current is not None:
                base = self.whole(current.document)
            elif applied is not None:
                base = self.whole(applied.document)
            else:
                base = normalise(self.local)
            changed = change(copy.deepcopy(base))
            if rebase and isinstance(changed, dict):
                changed = merge(shared_part(changed), self.local)
            document = self.check(self._fill_local(changed))
            self._keeps_local(base, document)
            try:
                self.store.save_draft(
                    connection,
                    shared_part(document),
                    actor,
                    base_revision=applied.number if applied else None,
                    expected_version=expected_version,
                    rebase=rebase,
                )
            except StaleDraft:
                raise Conflict(
                    "the draft changed since you read it; read it again and redo your change"
                ) from None
            changes = edit_summary(diff(base, document))
            self.store.record(
                connection, actor, "draft.edit", f"{what}: {changes}" if rebase else changes
            )
        draft = self.store.draft()
        assert draft is not None
        return draft

    def check(self, document: Any) -> Document:
        """The normal form of ``document`` if it passes every check (else ConfigError)."""
        try:
            normal = normalise(document)
        except ValidationError as exc:
            raise ConfigError(from_pydantic(exc, document)) from None
        parse_config(normal)
        return normal

    def _fill_local(self, document: Any) -> Any:
        """``document`` with each node-local setting it leaves out taken from this
        node (so a shared document, an export without them, edits cleanly)."""
        if not isinstance(document, dict):
            return document
        out = dict(document)
        mine = self.local
        for path in LOCAL:
            section, _dot, key = path.partition(".")
            if not key:
                if section not in out and section in mine:
                    out[section] = copy.deepcopy(mine[section])
                continue
            inner = out.get(section, {})
            if isinstance(inner, dict) and key not in inner and key in mine.get(section, {}):
                out[section] = {**inner, key: copy.deepcopy(mine[section][key])}
        return out

    def _keeps_local(self, base: Document, document: Document) -> None:
        """Refuse an edit of a node-local setting: each node sets those in its own
        configuration file (and a restart), never through the shared store."""
        moved = local_changes(base, document)
        if moved:
            node = base["gateway"]["node"]
            raise ConfigError(
                [
                    FieldProblem(
                        path,
                        f"node-local: set it in the configuration file of node {node!r} "
                        "and restart; shared edits cannot change it",
                    )
                    for path in moved
                ]
            )

    def stage(self, document: Any, actor: str, what: str, *, force: bool = False) -> Draft:
        """Make ``document`` the draft, refusing to replace one unless ``force``."""
        if not force and self.store.draft() is not None:
            raise Conflict(
                "a draft is staged already; apply or discard it first (or force the replacement)"
            )
        return self.edit(lambda _old: document, actor, what, rebase=True)

    def import_document(self, document: Any, actor: str, *, force: bool = False) -> Draft:
        return self.stage(document, actor, "import", force=force)

    def rollback(self, number: int, actor: str, *, force: bool = False) -> Draft:
        """Stage revision ``number`` as the draft (apply makes it current again)."""
        revision = self.store.revision(number)
        if revision is None:
            raise NotFound(f"no revision {number}")
        return self.stage(revision.document, actor, f"rollback to revision {number}", force=force)

    def discard(self, actor: str) -> None:
        with self.store.transaction() as connection:
            if not self.store.drop_draft(connection):
                raise NotFound("there is no draft to discard")
            self.store.record(connection, actor, "draft.discard")

    # -- validate and apply ----------------------------------------------------

    def validate(self, document: Document | None = None) -> list[FieldProblem]:
        """Every problem with the draft (or ``document``), deep checks included."""
        if document is None:
            document = self.working()[0]
        try:
            config = parse_config(self.check(document))
            check_configured(config)  # key pairs, expiry, key permissions, PINs
            Snapshot.compile(config, certificates=False)  # decrypts every secret once
        except ConfigError as exc:
            return name_objects(exc.problems, document)
        return []

    def apply(self, actor: str, comment: str = "", *, force: bool = False) -> ApplyResult:
        """Make the draft current. A draft staged on an older revision than the
        applied one would silently undo what was applied since; that needs
        ``force`` (after reading ``diff``, which shows the undoing)."""
        draft = self.store.draft()
        if draft is None:
            raise Conflict("there is no draft to apply")
        applied_number = self.store.applied_number()
        if not force and draft.base_revision != applied_number:
            raise Conflict(
                f"the draft was staged on revision {draft.base_revision}, but revision "
                f"{applied_number} has been applied since; applying would undo its changes. "
                "Check the diff, then force the apply, or discard the draft"
            )
        problems = self.validate(self.whole(draft.document))
        if problems:
            raise ConfigError(problems)
        with self.store.transaction() as connection:
            if self.store.draft(connection) != draft:
                raise Conflict("the draft changed while it was being validated; apply again")
            applied = self.store.applied(connection)
            before = self.whole(applied.document) if applied else {}
            changes = diff(before, self.whole(draft.document))
            shared = shared_part(draft.document)
            number = self.store.add_revision(connection, shared, actor, comment)
            self.store.drop_draft(connection)
            detail = json.dumps({"revision": number, "changes": len(changes), "comment": comment})
            self.store.record(connection, actor, "apply", detail)
        return ApplyResult(number, changes, restart_required(changes))

    # -- the configuration file --------------------------------------------------

    def adopt_file(self, config: GatewayConfig, source: str) -> tuple[Revision, str]:
        """Reconcile the store with the configuration file ``smtpgate serve`` was
        given; returns the revision to run and a sentence saying what happened.

        The file's node-local settings are this node's (noted in ``data_dir``
        for the API and the CLI). Its shared settings:

        * seed an empty store as revision 1;
        * become a new revision when they changed since the store last saw this
          node's file (a staged draft stays staged);
        * are left alone otherwise: changes applied through the API, the CLI or
          another node stay in force. A node joining a store that holds a
          configuration already runs the store's, whatever its file says.
        """
        document = to_document(config)
        node = config.gateway.node
        self.local = local_part(document)
        nodes.remember_local(self.data_dir, self.local)
        shared = shared_part(document)
        seen = digest(shared)
        last = self.store.meta(f"file_digest:{node}")
        with self.store.transaction() as connection:
            applied = self.store.applied(connection)
            if applied is None or (last is not None and last != seen):
                what = self._adopt(connection, applied, shared, source)
            elif last == seen:
                what = f"running revision {applied.number} from the store"
            else:
                what = _joined(node, applied, shared)
            self.store.set_meta(connection, f"file_digest:{node}", seen)
        revision = self.applied()
        draft = self.store.draft()
        if draft is not None:
            what += f"; a draft based on revision {draft.base_revision} is still staged"
        return revision, f"{what}: running revision {revision.number}"

    def _adopt(
        self, connection: Connection, applied: Revision | None, shared: Document, source: str
    ) -> str:
        """The file's shared settings as the next revision, unless they are in force."""
        if applied is not None and shared_part(applied.document) == shared:
            return "the configuration file matches"
        self.store.add_revision(connection, shared, source, "from the configuration file")
        self.store.record(connection, source, "apply", "configuration file changed")
        return "the configuration file is new or changed"


def _joined(node: str, applied: Revision, shared: Document) -> str:
    """What a node joining a store that has a configuration says about its file."""
    if shared_part(applied.document) == shared:
        return f"node {node} joins the store; its file matches the shared settings"
    return (
        f"node {node} joins the store and runs its shared settings; those in its "
        "configuration file differ and are not used (edit the shared settings "
        "with `smtpgate config`, from any node)"
    )


def edit_summary(changes: list[Change]) -> str:
    """One audit line for an edit: each change as ``config diff`` prints it
    (secrets only as "changed"), or "no change"."""
    return "; ".join(change.text() for change in changes) or "no change"


def record(store: ConfigStore, actor: str, action: str, detail: str = "") -> None:
    """An audit entry for a change outside the configuration (queue, credentials)."""
    with store.transaction() as connection:
        store.record(connection, actor, action, detail)


# -- API tokens ----------------------------------------------------------------


def token_digest(token: str) -> str:
    """Tokens are 256 random bits, so one SHA-256 is enough to keep them unusable
    at rest (a slow hash only matters for guessable secrets such as passwords)."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: ConfigStore, name: str, actor: str) -> str:
    token = "sgt_" + secrets.token_urlsafe(32)
    with store.transaction() as connection:
        if not store.add_token(connection, name, token_digest(token), actor):
            raise Conflict(f"a token named {name!r} exists already")
        store.record(connection, actor, "token.create", name)
    return token


def revoke_token(store: ConfigStore, name: str, actor: str) -> None:
    with store.transaction() as connection:
        if not store.remove_token(connection, name):
            raise NotFound(f"no token named {name!r}")
        store.record(connection, actor, "token.revoke", name)


def authenticate(store: ConfigStore, token: str) -> str | None:
    """The name of the token, or None when it is unknown."""
    return store.token_name(token_digest(token)) if token else None


# -- the running gateway's state, as the API reports it ------------------------


def node_status(store: ConfigStore, data_dir: Path, node: str) -> dict[str, Any]:
    """``GET /status``: the applied revision, this node's published state, the queue."""
    from smtpgate.queue.store import QueueStore  # noqa: PLC0415

    queue = QueueStore(data_dir / "queue")
    try:
        counts = queue.counts()
    finally:
        queue.close()
    applied = store.applied()
    published = json.loads(store.meta(f"node:{node}") or "{}")
    return {
        "node": node,
        "hostname": published.get("hostname"),
        "running_revision": published.get("running_revision"),
        "applied_revision": applied.number if applied else None,
        "restart_required": published.get("restart_required", []),
        "listeners": published.get("listeners", []),
        "pid": published.get("pid"),
        "scanners": published.get("scanners", {}),
        "queue": counts,
    }
