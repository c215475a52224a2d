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
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from smtpgate.config.document import (
    Change,
    Document,
    diff,
    digest,
    normalise,
    restart_required,
    to_document,
    to_yaml,
)
from smtpgate.config.load import from_pydantic, parse_config
from smtpgate.config.schema import GatewayConfig, GatewaySettings
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
    """The configuration lifecycle over one store."""

    store: ConfigStore
    data_dir: Path

    # -- reading ---------------------------------------------------------------

    def applied(self) -> Revision:
        revision = self.store.applied()
        if revision is None:
            raise NotFound("the store has no applied configuration yet (import one)")
        return revision

    def draft(self) -> Draft | None:
        return self.store.draft()

    def working(self) -> tuple[Document, int | None]:
        """The draft's document and version, or the applied document (version None)."""
        draft = self.store.draft()
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
        return revision.document

    def export(self, which: str, *, redact: bool = False) -> str:
        """``which`` (applied, draft or a revision number) as YAML for people."""
        return to_yaml(self.view(which), redact=redact)

    def diff(self) -> list[Change]:
        draft = self.store.draft()
        if draft is None:
            return []
        applied = self.store.applied()
        return diff(applied.document if applied else {}, draft.document)

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
        the result must pass every configuration check. The audit log records
        what changed, field by field, as ``config diff`` says it; a ``rebase``
        (the whole draft replaced: import, rollback) also says ``what`` it was."""
        with self.store.transaction() as connection:
            current = self.store.draft(connection)
            applied = self.store.applied(connection)
            if current is not None:
                base = current.document
            elif applied is not None:
                base = applied.document
            else:
                base = to_document(GatewayConfig(gateway=GatewaySettings(data_dir=self.data_dir)))
            document = self.check(
                change(copy.deepcopy(base)), base, new_store=current is None and applied is None
            )
            try:
                self.store.save_draft(
                    connection,
                    document,
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

    def check(
        self, document: Any, base: Document | None = None, *, new_store: bool = False
    ) -> Document:
        """The normal form of ``document`` if it passes every check (else ConfigError);
        ``base`` is the document it replaces, whose data directory and store it must
        keep (the first document of a ``new_store`` says where the store is)."""
        try:
            normal = normalise(document)
        except ValidationError as exc:
            raise ConfigError(from_pydantic(exc, document)) from None
        parse_config(normal)
        # where this store lives: only the file can move it (and a restart)
        defaults = {"store": "", "store_password_file": None}  # documents from before them
        for name in ("data_dir",) if new_store else ("data_dir", "store", "store_password_file"):
            now = normal["gateway"].get(name, defaults.get(name))
            kept = base["gateway"].get(name, defaults.get(name)) if base else now
            if now != kept:
                shown = kept if kept else "empty"
                raise ConfigError(
                    [
                        FieldProblem(
                            f"gateway.{name}",
                            f"cannot change here: it is where this store lives ({shown}); "
                            "change it in the configuration file and restart",
                        )
                    ]
                )
        return normal

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
            config = parse_config(self.check(document, self.store.applied_document()))
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
        problems = self.validate(draft.document)
        if problems:
            raise ConfigError(problems)
        with self.store.transaction() as connection:
            if self.store.draft(connection) != draft:
                raise Conflict("the draft changed while it was being validated; apply again")
            applied = self.store.applied(connection)
            changes = diff(applied.document if applied else {}, draft.document)
            number = self.store.add_revision(connection, draft.document, actor, comment)
            self.store.drop_draft(connection)
            detail = json.dumps({"revision": number, "changes": len(changes), "comment": comment})
            self.store.record(connection, actor, "apply", detail)
        return ApplyResult(number, changes, restart_required(changes))

    # -- the configuration file --------------------------------------------------

    def adopt_file(self, config: GatewayConfig, source: str) -> tuple[Revision, str]:
        """Reconcile the store with the configuration file ``smtpgate serve`` was
        given; returns the revision to run and a sentence saying what happened.

        * an empty store takes the file as revision 1;
        * a file that changed since the store last saw it becomes a new revision
          (a staged draft stays staged);
        * an unchanged file leaves the store alone: changes applied through the
          API or CLI since then stay in force.
        """
        document = to_document(config)
        seen = digest(document)
        applied = self.store.applied()
        if applied is not None and self.store.meta("file_digest") == seen:
            return applied, f"running revision {applied.number} from the store"
        with self.store.transaction() as connection:
            applied = self.store.applied(connection)
            if applied is None or applied.document != document:
                self.store.add_revision(connection, document, source, "from the configuration file")
                self.store.record(connection, source, "apply", "configuration file changed")
                what = "the configuration file is new or changed"
            else:
                what = "the configuration file matches"
            self.store.set_meta(connection, "file_digest", seen)
        revision = self.applied()
        draft = self.store.draft()
        if draft is not None:
            what += f"; a draft based on revision {draft.base_revision} is still staged"
        return revision, f"{what}: running revision {revision.number}"


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


def node_status(store: ConfigStore, data_dir: Path) -> dict[str, Any]:
    """``GET /status``: the applied revision, each node's published state, the queue."""
    from smtpgate.queue.store import QueueStore  # noqa: PLC0415

    queue = QueueStore(data_dir / "queue")
    try:
        counts = queue.counts()
    finally:
        queue.close()
    applied = store.applied()
    node = applied.document["gateway"]["node"] if applied else ""
    published = json.loads(store.meta(f"node:{node}") or "{}")
    return {
        "node": node,
        "hostname": published.get("hostname"),
        "running_revision": published.get("running_revision"),
        "applied_revision": applied.number if applied else None,
        "restart_required": published.get("restart_required", []),
        "listeners": published.get("listeners", []),
        "pid": published.get("pid"),
        "queue": counts,
    }
