"""The configuration as a document: normal form, YAML export, diff, restart needs.

A document is the JSON form of :class:`GatewayConfig` with every default filled
in, so two documents are equal exactly when the configurations are. Secrets
appear as their ``enc:v1:`` tokens (or ``<redacted>``), never in clear.

``diff`` is pure: it compares two documents per object and field and says
what changed in the words an administrator uses ("connection profile
partner: relay restricted-internal → restricted-external"). Named objects
(listeners, certificates, send connectors, profiles, credentials) are matched
by name, so reordering them is not a change.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from smtpgate.config.schema import GatewayConfig

Document = dict[str, Any]

# Lists whose items are matched by this key rather than by position.
KEYS = {
    "listeners": "name",
    "certificates": "name",
    "send_connectors": "name",
    "connection_profiles": "name",
    "credentials": "username",
}
LABELS = {
    "gateway": "gateway",
    "hosted_domains": "hosted domains",
    "listeners": "listener",
    "certificates": "certificate",
    "limits": "limits",
    "timeouts": "timeouts",
    "send_connectors": "send connector",
    "connection_profiles": "connection profile",
    "default_profile": "default profile",
    "spoof_detection": "spoof detection",
    "tls": "tls",
    "spam": "spam",
    "queue": "queue",
    "admin": "admin",
    "virus": "virus scanning",
    "quarantine": "quarantine",
    "recipient_validation": "recipient validation",
    "tracking": "message tracking",
    "logging": "logging",
}
SECRET_FIELDS = frozenset({"password", "pin"})

# What a running gateway takes on at apply; everything else waits for a restart
# (listener sockets, TLS contexts, session limits and the node's identity are
# built once at start-up).
LIVE = (
    "hosted_domains",
    "send_connectors",
    "connection_profiles",
    "default_profile",
    "spoof_detection",
    "spam",
    "virus",
    "quarantine",
    "recipient_validation",  # read per RCPT from the session's snapshot
    "tracking",  # the retention is read at each expiry run
    "tls.opportunistic",
    "queue.retry",
    "queue.delay_warning",
    "gateway.admin_address",
    "gateway.roles",
)


# Node-local settings: each node keeps them in its own configuration file and
# they are never part of the shared revisions in the store. They say who the
# node is and where (name, host name, roles, data directory, store, resolver),
# and what it binds (listeners, admin listener): two peers differ there, and a
# shared edit must never move one node's sockets or identity. Everything else
# is shared by every peer of the store. See docs/cluster.md.
LOCAL = (
    "gateway.node",
    "gateway.hostname",
    "gateway.roles",
    "gateway.data_dir",
    "gateway.store",
    "gateway.store_password_file",
    "gateway.dns",
    "gateway.user",
    "gateway.group",
    "gateway.allow_root",
    "gateway.workers",  # this machine's cores
    "gateway.cpu_affinity",
    "listeners",
    "admin",
    "logging",  # where this node's log goes
)


def split(document: Document) -> tuple[Document, Document]:
    """``document`` as its shared part and its node-local part (each holds only
    the keys ``document`` had)."""
    shared = copy.deepcopy(document)
    local: Document = {}
    for path in LOCAL:
        section, _dot, key = path.partition(".")
        if not key:
            if section in shared:
                local[section] = shared.pop(section)
        elif isinstance(shared.get(section), dict) and key in shared[section]:
            local.setdefault(section, {})[key] = shared[section].pop(key)
    return shared, local


def shared_part(document: Document) -> Document:
    return split(document)[0]


def local_part(document: Document) -> Document:
    return split(document)[1]


def merge(shared: Document, local: Document) -> Document:
    """The whole document of one node: ``shared`` with the node's ``local`` keys
    (which win over any local keys ``shared`` may still hold)."""
    out = copy.deepcopy(shared)
    for section, value in local.items():
        if section == "gateway" and isinstance(value, dict):
            gateway = out.get("gateway")
            out["gateway"] = {**(gateway if isinstance(gateway, dict) else {}), **value}
        else:
            out[section] = copy.deepcopy(value)
    return out


def local_changes(before: Document, after: Document) -> list[str]:
    """The node-local settings that differ between two whole documents."""
    old, new = local_part(before), local_part(after)
    changed = []
    for path in LOCAL:
        section, _dot, key = path.partition(".")
        if key:
            if old.get(section, {}).get(key) != new.get(section, {}).get(key):
                changed.append(path)
        elif old.get(section) != new.get(section):
            changed.append(path)
    return changed


def to_document(config: GatewayConfig, *, redact: bool = False) -> Document:
    """The normal form of ``config`` (JSON types, defaults filled in)."""
    document: Document = config.model_dump(mode="json", context={"redact": redact})
    return document


def normalise(document: Any) -> Document:
    """Check ``document`` against the schema (no cross-field checks) and return
    its normal form; raises pydantic's ValidationError."""
    return to_document(GatewayConfig.model_validate(document or {}))


def digest(document: Document) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def to_yaml(document: Document, *, minimal: bool = True, redact: bool = False) -> str:
    """YAML for people: with ``minimal``, settings left at their default are
    omitted (except the host name, whose default is the machine's name), which
    keeps an export as short as the file it came from."""
    config = GatewayConfig.model_validate(document)
    out = config.model_dump(mode="json", exclude_defaults=minimal, context={"redact": redact})
    out["gateway"] = {"hostname": config.gateway.hostname, **out["gateway"]}
    return _mark_local(yaml.safe_dump(out, sort_keys=False, allow_unicode=True))


LOCAL_MARK = "  # node-local"


def _mark_local(text: str) -> str:
    """Mark the node-local settings in an export, so an administrator sees
    which lines the store shares and which come from this node's own file."""
    top = {path for path in LOCAL if "." not in path}
    inner = {path.split(".", 1)[1] for path in LOCAL if path.startswith("gateway.")}
    lines, section = [], ""
    for line in text.splitlines():
        local = False
        if line and not line.startswith((" ", "-")):
            section = line.split(":", 1)[0]
            local = section in top
        elif section == "gateway" and line.startswith("  ") and not line.startswith("   "):
            local = line[2:].split(":", 1)[0] in inner
        lines.append(line + LOCAL_MARK if local else line)
    header = (
        "# Settings marked node-local come from this node's configuration file and\n"
        "# are not shared; everything else is shared by every peer of the store.\n"
    )
    return header + "\n".join(lines) + "\n"


# -- diff ------------------------------------------------------------------

Kind = Literal["added", "removed", "changed"]


@dataclass(frozen=True)
class Change:
    """One difference: ``subject`` is the object ("connection profile partner"),
    ``field`` the setting inside it (empty for a whole object)."""

    path: str
    subject: str
    field: str
    kind: Kind
    old: Any = None
    new: Any = None

    def text(self) -> str:
        where = f"{self.subject}: {self.field}" if self.field else self.subject
        if self.kind != "changed":
            shown = self.new if self.kind == "added" else self.old
            value = "" if shown is None else f" {_show(shown, self.field)}"
            return f"{where}: {self.kind}{value}"
        if self.field.rsplit(".", 1)[-1] in SECRET_FIELDS:
            return f"{where} changed (secret not shown)"
        return f"{where} {_show(self.old, self.field)} → {_show(self.new, self.field)}"

    def as_dict(self) -> dict[str, Any]:
        secret = self.field.rsplit(".", 1)[-1] in SECRET_FIELDS
        return {
            "path": self.path,
            "subject": self.subject,
            "field": self.field,
            "kind": self.kind,
            "old": None if secret else self.old,
            "new": None if secret else self.new,
            "text": self.text(),
        }


def _show(value: Any, field: str) -> str:
    if field.rsplit(".", 1)[-1] in SECRET_FIELDS:
        return "(secret)"
    if isinstance(value, str):
        return value
    if value is None:
        return "(none)"
    return json.dumps(value, separators=(", ", ": "))


def diff(old: Document, new: Document) -> list[Change]:
    """Every change from ``old`` to ``new``, in schema order."""
    changes: list[Change] = []
    for key in list(dict.fromkeys([*old, *new])):
        label = LABELS.get(key, key)
        _walk(changes, key, label, "", old.get(key), new.get(key))
    return changes


def _walk(  # noqa: PLR0913, PLR0917 - the position in both documents
    out: list[Change], path: str, subject: str, field: str, old: Any, new: Any
) -> None:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(dict.fromkeys([*old, *new])):
            inner = f"{field}.{key}" if field else key
            _walk(out, f"{path}.{key}", subject, inner, old.get(key), new.get(key))
        return
    if isinstance(old, list) and isinstance(new, list):
        name = path.rsplit(".", 1)[-1].split("[", maxsplit=1)[0]
        key = KEYS.get(name)
        if key and _keyed(old, key) and _keyed(new, key):
            _walk_named(out, path, subject, field, key, (old, new))
        else:
            _walk_items(out, path, subject, field, old, new)
        return
    out.append(Change(path, subject, field, "changed", old, new))


def _keyed(items: list[Any], key: str) -> bool:
    return all(isinstance(item, dict) and key in item for item in items)


def _walk_named(  # noqa: PLR0913, PLR0917
    out: list[Change],
    path: str,
    subject: str,
    field: str,
    key: str,
    pair: tuple[list[Any], list[Any]],
) -> None:
    before = {item[key]: item for item in pair[0]}
    after = {item[key]: item for item in pair[1]}
    top = not field  # a top-level section: each object is its own subject
    for name in list(dict.fromkeys([*before, *after])):
        item_path = f"{path}[{name}]"
        item_subject = f"{subject} {name}" if top else subject
        item_field = "" if top else f"{field}[{name}]"
        if name not in after:
            out.append(Change(item_path, item_subject, item_field, "removed"))
        elif name not in before:
            out.append(Change(item_path, item_subject, item_field, "added"))
        else:
            _walk(out, item_path, item_subject, item_field, before[name], after[name])


def _walk_items(  # noqa: PLR0913, PLR0917
    out: list[Change], path: str, subject: str, field: str, old: list[Any], new: list[Any]
) -> None:
    removed = [item for item in old if item not in new]
    added = [item for item in new if item not in old]
    for item in removed:
        out.append(Change(path, subject, field, "removed", old=item))
    for item in added:
        out.append(Change(path, subject, field, "added", new=item))
    if not removed and not added:  # same items, new order (order can matter: protocols)
        out.append(Change(path, subject, field, "changed", old, new))


def restart_required(changes: list[Change]) -> list[str]:
    """The changed settings a running gateway only takes on when restarted."""
    needed = []
    for change in changes:
        plain = change.path.split("[")[0]
        if not any(plain == live or plain.startswith(live + ".") for live in LIVE):
            needed.append(change.path)
    return list(dict.fromkeys(needed))
