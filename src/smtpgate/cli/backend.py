"""Where the configuration commands act: the local store, or a gateway's REST API.

Both backends offer the same operations and raise the same errors
(``ConfigError`` with field paths, ``NotFound``, ``Conflict``), so each
command is written once. The local backend records the Unix user in the
audit log (``cli:alice``); the API records the token's name.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from smtpgate.admin import nodes
from smtpgate.admin.services import ConfigService, record
from smtpgate.config.document import Document
from smtpgate.config.store import ConfigStore, store_exists
from smtpgate.errors import AdminError, ConfigError, Conflict, FieldProblem, NotFound


class Backend(Protocol):
    def working(self) -> tuple[Document, int | None]: ...
    def put_draft(self, document: Document, version: int | None, what: str) -> None: ...
    def view(self, which: str) -> Document: ...
    def diff(self) -> dict[str, Any]: ...
    def validate(self) -> list[dict[str, str]]: ...
    def apply(self, comment: str, force: bool, wait: float) -> dict[str, Any]: ...
    def discard(self) -> None: ...
    def history(self) -> list[dict[str, Any]]: ...
    def audit(self) -> list[dict[str, Any]]: ...
    def rollback(self, revision: int, force: bool) -> None: ...
    def import_document(self, document: Any, force: bool) -> None: ...
    def export(self, which: str, redact: bool) -> str: ...
    def close(self) -> None: ...


def local_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def record_locally(data_dir: Path, action: str, detail: str) -> None:
    """An audit entry as ``cli:USER`` for an action outside the configuration
    (queue actions, credentials sent), when the data directory has a store."""
    if not store_exists(data_dir):
        return
    store = ConfigStore.open(data_dir)
    try:
        record(store, local_actor(), action, detail)
    finally:
        store.close()


@dataclass
class LocalBackend:
    """The store in a data directory, used directly."""

    service: ConfigService
    actor: str

    @classmethod
    def open(cls, data_dir: Path) -> LocalBackend:
        return cls(ConfigService(ConfigStore.open(data_dir), data_dir), local_actor())

    def working(self) -> tuple[Document, int | None]:
        return self.service.working()

    def put_draft(self, document: Document, version: int | None, what: str) -> None:
        self.service.edit(lambda _old: document, self.actor, what, version)

    def view(self, which: str) -> Document:
        return self.service.view(which)

    def diff(self) -> dict[str, Any]:
        return self.service.diff_report()

    def validate(self) -> list[dict[str, str]]:
        return [{"path": p.path, "message": p.message} for p in self.service.validate()]

    def apply(self, comment: str, force: bool, wait: float) -> dict[str, Any]:
        result = self.service.apply(self.actor, comment, force=force).as_dict()
        if wait:
            found = nodes.wait_applied(self.service.store, result["revision"], wait)
            result |= nodes.apply_report(found)
        return result

    def discard(self) -> None:
        self.service.discard(self.actor)

    def history(self) -> list[dict[str, Any]]:
        return [r.summary() for r in self.service.history()]

    def audit(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self.service.store.audit_log()]

    def rollback(self, revision: int, force: bool) -> None:
        self.service.rollback(revision, self.actor, force=force)

    def import_document(self, document: Any, force: bool) -> None:
        self.service.import_document(document, self.actor, force=force)

    def export(self, which: str, redact: bool) -> str:
        return self.service.export(which, redact=redact)

    def close(self) -> None:
        self.service.store.close()


class ApiBackend:
    """A running gateway's REST API (``--api URL``, token from ``--token`` or
    ``SMTPGATE_TOKEN``)."""

    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(
            base_url=url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the API at {self.client.base_url}: {exc}") from None
        if response.status_code < 300:
            return (
                response.json()
                if "json" in response.headers.get("content-type", "")
                else (response.text)
            )
        raise _error(response)

    def working(self) -> tuple[Document, int | None]:
        draft = self.call("GET", "/config/draft")
        return draft["document"], draft["version"]

    def put_draft(self, document: Document, version: int | None, what: str) -> None:
        headers = {"If-Match": str(version)} if version is not None else {}
        self.call("PUT", "/config/draft", json=document, headers=headers)

    def view(self, which: str) -> Document:
        if which == "draft":
            return self.working()[0]
        if which == "applied":
            found: Document = self.call("GET", "/config/applied")["document"]
            return found
        revision: Document = self.call("GET", f"/config/revisions/{int(which)}")["document"]
        return revision

    def diff(self) -> dict[str, Any]:
        found: dict[str, Any] = self.call("GET", "/config/diff")
        return found

    def validate(self) -> list[dict[str, str]]:
        found: list[dict[str, str]] = self.call("POST", "/config/validate")["problems"]
        return found

    def apply(self, comment: str, force: bool, wait: float) -> dict[str, Any]:
        body = {"comment": comment, "force": force, "wait": wait}
        found: dict[str, Any] = self.call("POST", "/config/apply", json=body, timeout=wait + 60)
        return found

    def discard(self) -> None:
        self.call("DELETE", "/config/draft")

    def history(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", "/config/history")
        return found

    def audit(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", "/audit")
        return found

    def rollback(self, revision: int, force: bool) -> None:
        self.call("POST", "/config/rollback", json={"revision": revision, "force": force})

    def import_document(self, document: Any, force: bool) -> None:
        self.call("POST", "/config/import", json={"document": document, "force": force})

    def export(self, which: str, redact: bool) -> str:
        params: dict[str, str | bool] = {"which": which, "redact": redact}
        text: str = self.call("GET", "/config/export", params=params)["yaml"]
        return text

    def close(self) -> None:
        self.client.close()


def _error(response: httpx.Response) -> Exception:
    try:
        body = response.json()
        detail = str(body.get("detail", response.reason_phrase))
        problems = [FieldProblem(p["path"], p["message"]) for p in body.get("problems", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        detail, problems = f"{response.status_code} {response.reason_phrase}", []
    if response.status_code == 422 and problems:
        return ConfigError(problems)
    if response.status_code == 404:
        return NotFound(detail)
    if response.status_code == 409:
        return Conflict(detail)
    return AdminError(f"{detail} (HTTP {response.status_code})")
