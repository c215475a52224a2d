"""Pure edits of a configuration document, shared by the REST API and the CLI.

Named objects live in the collections of :data:`COLLECTIONS` and are found
by name; the other top-level settings are sections replaced whole. Field
edits use a small language that the CLI exposes directly::

    relay=restricted-external          set (the value is read as YAML)
    inbound_tls.mandatory=true         set inside a nested mapping
    client_hosts+=10.1.0.0/16          append to a list (unless present)
    client_hosts-=10.1.0.0/16          remove from a list
    notes=                             set to the empty string

Every function returns a new document and raises ``NotFound`` or
``Conflict`` with a sentence saying what was wrong; the caller checks the
result against the schema.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from smtpgate.config.document import Document
from smtpgate.errors import AdminError, Conflict, NotFound

COLLECTIONS = {
    "connection_profiles": "connection profile",
    "send_connectors": "send connector",
    "certificates": "certificate",
    "listeners": "listener",
}
SECTIONS = (
    "gateway",
    "limits",
    "timeouts",
    "default_profile",
    "tls",
    "spam",
    "queue",
    "admin",
    "virus",
    "quarantine",
)
# List fields inside objects that the API exposes as their own resources.
ITEM_LISTS = {
    ("connection_profiles", "client_hosts"),
    ("connection_profiles", "sender_domains"),
    ("send_connectors", "namespaces"),
}


def items(document: Document, collection: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = document.get(collection, [])
    return found


def get_item(document: Document, collection: str, name: str) -> dict[str, Any]:
    for item in items(document, collection):
        if item.get("name") == name:
            return item
    raise NotFound(f"no {COLLECTIONS[collection]} named {name!r}")


def add_item(document: Document, collection: str, item: dict[str, Any]) -> Document:
    name = item.get("name")
    if any(existing.get("name") == name for existing in items(document, collection)):
        raise Conflict(f"a {COLLECTIONS[collection]} named {name!r} exists already")
    out = copy.deepcopy(document)
    out.setdefault(collection, []).append(copy.deepcopy(item))
    return out


def replace_item(document: Document, collection: str, name: str, item: dict[str, Any]) -> Document:
    """Replace the object ``name`` in place (renaming it when ``item`` says so)."""
    get_item(document, collection, name)
    new_name = item.get("name", name)
    if new_name != name and any(i.get("name") == new_name for i in items(document, collection)):
        raise Conflict(f"a {COLLECTIONS[collection]} named {new_name!r} exists already")
    out = copy.deepcopy(document)
    out[collection] = [
        {**copy.deepcopy(item), "name": new_name} if i.get("name") == name else i
        for i in out[collection]
    ]
    return out


def delete_item(document: Document, collection: str, name: str) -> Document:
    get_item(document, collection, name)
    out = copy.deepcopy(document)
    out[collection] = [i for i in out[collection] if i.get("name") != name]
    return out


def add_value(document: Document, where: tuple[str, str, str], value: Any) -> Document:
    """Append ``value`` to list ``field`` of object ``name`` in ``collection``."""
    collection, name, field = where
    out = copy.deepcopy(document)
    target = get_item(out, collection, name).setdefault(field, [])
    if value in target:
        raise Conflict(f"{value!r} is already in {field} of {COLLECTIONS[collection]} {name}")
    target.append(value)
    return out


def remove_value(document: Document, where: tuple[str, str, str], value: Any) -> Document:
    collection, name, field = where
    out = copy.deepcopy(document)
    target = get_item(out, collection, name).get(field, [])
    if value not in target:
        raise NotFound(f"{value!r} is not in {field} of {COLLECTIONS[collection]} {name}")
    target.remove(value)
    return out


# -- the field edit language ----------------------------------------------------


def apply_edits(obj: dict[str, Any], edits: list[str]) -> dict[str, Any]:
    """``obj`` with each ``field=value`` / ``field+=value`` / ``field-=value`` applied."""
    out = copy.deepcopy(obj)
    for edit in edits:
        path, operator, value = _parse_edit(edit)
        parent, leaf = _walk_to(out, path, edit)
        if operator == "=":
            parent[leaf] = value
            continue
        current = parent.setdefault(leaf, [])
        if not isinstance(current, list):
            raise AdminError(f"{edit}: {path} is not a list")
        values = value if isinstance(value, list) else [value]
        if operator == "+=":
            current.extend(v for v in values if v not in current)
        else:
            missing = [v for v in values if v not in current]
            if missing:
                raise NotFound(f"{edit}: {missing[0]!r} is not in {path}")
            parent[leaf] = [v for v in current if v not in values]
    return out


def _parse_edit(edit: str) -> tuple[str, str, Any]:
    path, sep, raw = edit.partition("=")
    if not sep or not path:
        raise AdminError(f"{edit!r}: write FIELD=VALUE, FIELD+=VALUE or FIELD-=VALUE")
    operator = "="
    if path.endswith(("+", "-")):
        operator, path = path[-1] + "=", path[:-1]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise AdminError(f"{edit!r}: the value is not valid YAML") from None
    return path.strip(), operator, value


def _walk_to(obj: dict[str, Any], path: str, edit: str) -> tuple[dict[str, Any], str]:
    parts = path.split(".")
    node = obj
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise AdminError(f"{edit}: {part} is not a group of settings")
        node = child
    return node, parts[-1]
