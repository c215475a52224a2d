"""The configuration routes: the draft/diff/validate/apply lifecycle, history
and rollback, and one resource per part of the schema (generated from the
schema's models, so the OpenAPI spec is the schema)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from pydantic import BaseModel, Field

from smtpgate.admin import edit, nodes
from smtpgate.admin.http import Actor, Flag, StrictBody, Value, problems
from smtpgate.admin.services import ConfigService
from smtpgate.config.document import Document
from smtpgate.config.schema import (
    AdminSettings,
    Certificate,
    ConnectionProfile,
    DefaultProfile,
    GatewaySettings,
    Limits,
    Listener,
    Namespace,
    OutboundSecurity,
    QuarantineSettings,
    QueueSettings,
    ReceiveConnectors,
    SendConnector,
    SenderAuthSettings,
    SpamSettings,
    Timeouts,
    TlsSettings,
    TrackingSettings,
    VirusSettings,
)
from smtpgate.errors import Conflict, NotFound

COLLECTION_MODELS: dict[str, type[BaseModel]] = {
    "connection_profiles": ConnectionProfile,
    "send_connectors": SendConnector,
    "certificates": Certificate,
    "listeners": Listener,
}
SECTION_MODELS: dict[str, type[BaseModel]] = {
    "gateway": GatewaySettings,
    "limits": Limits,
    "timeouts": Timeouts,
    "default_profile": DefaultProfile,
    "tls": TlsSettings,
    "spam": SpamSettings,
    "queue": QueueSettings,
    "admin": AdminSettings,
    "virus": VirusSettings,
    "quarantine": QuarantineSettings,
    "sender_auth": SenderAuthSettings,
    "outbound_security": OutboundSecurity,
    "receive_connectors": ReceiveConnectors,
    "tracking": TrackingSettings,
}


class ApplyRequest(StrictBody):
    comment: str = Field(default="", max_length=1000)
    force: bool = False  # apply a draft staged on an older revision
    # seconds to wait for every running gateway to enforce the revision; 0: do not wait
    wait: float = Field(default=10, ge=0, le=120)


class RollbackRequest(StrictBody):
    revision: int = Field(ge=1)
    force: bool = False


class ImportRequest(StrictBody):
    document: dict[str, Any]
    force: bool = False


def _draft_view(service: ConfigService) -> dict[str, Any]:
    draft = service.draft()
    if draft is None:
        applied = service.applied()
        return {"staged": False, "version": None, "base_revision": applied.number,
                "document": applied.document}  # fmt: skip
    return {
        "staged": True,
        "version": draft.version,
        "base_revision": draft.base_revision,
        "updated_by": draft.updated_by,
        "document": draft.document,
    }


def _lifecycle_routes(router: APIRouter, service: ConfigService) -> None:

    @router.get("/config/applied", tags=["config"])
    def applied() -> dict[str, Any]:
        revision = service.applied()
        return {"revision": revision.number, "document": revision.document}

    @router.get("/config/draft", tags=["config"])
    def get_draft() -> dict[str, Any]:
        return _draft_view(service)

    @router.put("/config/draft", tags=["config"])
    def put_draft(
        document: dict[str, Any],
        who: Actor,
        if_match: Annotated[int | None, Header()] = None,
    ) -> dict[str, Any]:
        service.edit(lambda _old: document, who, "whole document", if_match)
        return _draft_view(service)

    @router.delete("/config/draft", tags=["config"])
    def discard(who: Actor) -> dict[str, str]:
        service.discard(who)
        return {"result": "draft discarded"}

    @router.get("/config/diff", tags=["config"])
    def get_diff() -> dict[str, Any]:
        return service.diff_report()

    @router.post("/config/validate", tags=["config"])
    def validate() -> dict[str, Any]:
        found = service.validate()
        return {"valid": not found, "problems": problems(found)}

    @router.post("/config/apply", tags=["config"])
    def apply(request: ApplyRequest, who: Actor) -> dict[str, Any]:
        result = service.apply(who, request.comment, force=request.force).as_dict()
        if request.wait:
            found = nodes.wait_applied(service.store, result["revision"], request.wait)
            result |= nodes.apply_report(found)
        return result

    @router.get("/config/history", tags=["config"])
    def history() -> list[dict[str, Any]]:
        return [r.summary() for r in service.history()]

    @router.get("/config/revisions/{number}", tags=["config"])
    def revision(number: int) -> dict[str, Any]:
        return {"revision": number, "document": service.view(str(number))}

    @router.post("/config/rollback", tags=["config"])
    def rollback(request: RollbackRequest, who: Actor) -> dict[str, Any]:
        service.rollback(request.revision, who, force=request.force)
        return _draft_view(service)

    @router.post("/config/import", tags=["config"])
    def import_document(request: ImportRequest, who: Actor) -> dict[str, Any]:
        service.import_document(request.document, who, force=request.force)
        return _draft_view(service)

    @router.get("/config/export", tags=["config"])
    def export(
        which: Literal["applied", "draft"] = "applied", redact: bool = False
    ) -> dict[str, str]:
        """The configuration as YAML (in ``yaml``), as ``smtpgate config export`` prints it."""
        return {"which": which, "yaml": service.export(which, redact=redact)}

    @router.get("/audit", tags=["config"])
    def audit_log(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        return [e.as_dict() for e in service.store.audit_log(limit)]


def _object_routes(router: APIRouter, service: ConfigService) -> None:
    for collection, model in COLLECTION_MODELS.items():
        _collection_routes(router, service, collection, model)
    for section, model in SECTION_MODELS.items():
        _section_routes(router, service, section, model)
    for collection, field in sorted(edit.ITEM_LISTS):
        if field != "namespaces":
            _value_routes(router, service, collection, field)
    _namespace_routes(router, service)
    _domain_routes(router, service)


def _typed(function: Callable[..., Any], **annotations: Any) -> Callable[..., Any]:
    """Give a generated endpoint its real body type (FastAPI reads annotations)."""
    function.__annotations__.update(annotations)
    return function


def _collection_routes(
    router: APIRouter, service: ConfigService, collection: str, model: type[BaseModel]
) -> None:
    base = f"/config/draft/{collection}"
    label = edit.COLLECTIONS[collection]
    tags: list[str | Any] = [collection]

    def listing() -> list[dict[str, Any]]:
        return edit.items(service.working()[0], collection)

    def show(name: str) -> dict[str, Any]:
        return edit.get_item(service.working()[0], collection, name)

    def create(item: Any, who: Actor) -> dict[str, Any]:
        body = item.model_dump(mode="json")
        service.edit(lambda d: edit.add_item(d, collection, body), who, f"add {label}")
        return show(body["name"])

    def replace(name: str, item: Any, who: Actor) -> dict[str, Any]:
        body = item.model_dump(mode="json")
        service.edit(lambda d: edit.replace_item(d, collection, name, body), who, f"{label} {name}")
        return show(body["name"])

    def remove(name: str, who: Actor) -> dict[str, str]:
        service.edit(lambda d: edit.delete_item(d, collection, name), who, f"delete {label} {name}")
        return {"result": f"{label} {name} deleted from the draft"}

    router.get(base, tags=tags, summary=f"list {label}s")(listing)
    router.post(base, tags=tags, status_code=201, summary=f"add a {label}")(
        _typed(create, item=model)
    )
    router.get(base + "/{name}", tags=tags, summary=f"one {label}")(show)
    router.put(base + "/{name}", tags=tags, summary=f"replace a {label}")(
        _typed(replace, item=model)
    )
    router.delete(base + "/{name}", tags=tags, summary=f"delete a {label}")(remove)


def _section_routes(
    router: APIRouter, service: ConfigService, section: str, model: type[BaseModel]
) -> None:
    def show() -> dict[str, Any]:
        found: dict[str, Any] = service.working()[0][section]
        return found

    def replace(settings: Any, who: Actor) -> dict[str, Any]:
        body = settings.model_dump(mode="json")
        service.edit(lambda d: {**d, section: body}, who, f"{section} settings")
        return show()

    path = f"/config/draft/{section}"
    router.get(path, tags=["settings"], summary=f"the {section} settings")(show)
    router.put(path, tags=["settings"], summary=f"replace the {section} settings")(
        _typed(replace, settings=model)
    )


def _value_routes(router: APIRouter, service: ConfigService, collection: str, field: str) -> None:
    base = f"/config/draft/{collection}/{{name}}/{field}"
    tags: list[str | Any] = [collection]

    def listing(name: str) -> list[Any]:
        found: list[Any] = edit.get_item(service.working()[0], collection, name).get(field, [])
        return found

    def add(name: str, body: Value, who: Actor) -> list[Any]:
        where = (collection, name, field)
        service.edit(lambda d: edit.add_value(d, where, body.value), who, f"{name} {field} add")
        return listing(name)

    def remove(name: str, value: str, who: Actor) -> list[Any]:
        where = (collection, name, field)
        service.edit(lambda d: edit.remove_value(d, where, value), who, f"{name} {field} remove")
        return listing(name)

    router.get(base, tags=tags, summary=f"the {field} of one object")(listing)
    router.post(base, tags=tags, status_code=201, summary=f"add to {field}")(add)
    router.delete(base + "/{value:path}", tags=tags, summary=f"remove from {field}")(remove)


def _namespace_routes(router: APIRouter, service: ConfigService) -> None:
    base = "/config/draft/send_connectors/{name}/namespaces"

    @router.get(base, tags=["send_connectors"])
    def namespaces(name: str) -> list[Any]:
        found: list[Any] = edit.get_item(service.working()[0], "send_connectors", name)[
            "namespaces"
        ]
        return found

    @router.put(base, tags=["send_connectors"])
    def replace(name: str, body: list[Namespace], who: Actor) -> list[Any]:
        items = [n.model_dump(mode="json") for n in body]

        def change(document: Document) -> Document:
            connector = edit.get_item(document, "send_connectors", name)
            return edit.replace_item(
                document, "send_connectors", name, {**connector, "namespaces": items}
            )

        service.edit(change, who, f"send connector {name} namespaces")
        return namespaces(name)


def _domain_routes(router: APIRouter, service: ConfigService) -> None:
    base = "/config/draft/hosted_domains"

    @router.get(base, tags=["settings"])
    def domains() -> list[str]:
        found: list[str] = service.working()[0]["hosted_domains"]
        return found

    @router.post(base, tags=["settings"], status_code=201)
    def add(body: Value, who: Actor) -> list[str]:
        def change(document: Document) -> Document:
            if body.value.lower() in document["hosted_domains"]:
                raise Conflict(f"{body.value} is a hosted domain already")
            return {**document, "hosted_domains": [*document["hosted_domains"], body.value]}

        service.edit(change, who, f"add hosted domain {body.value}")
        return domains()

    @router.delete(base + "/{domain}", tags=["settings"])
    def remove(domain: str, who: Actor) -> list[str]:
        def change(document: Document) -> Document:
            if domain.lower() not in document["hosted_domains"]:
                raise NotFound(f"{domain} is not a hosted domain")
            kept = [d for d in document["hosted_domains"] if d != domain.lower()]
            return {**document, "hosted_domains": kept}

        service.edit(change, who, f"remove hosted domain {domain}")
        return domains()

    @router.get("/config/draft/spoof_detection", tags=["settings"])
    def spoof() -> Flag:
        return Flag(value=service.working()[0]["spoof_detection"])

    @router.put("/config/draft/spoof_detection", tags=["settings"])
    def set_spoof(body: Flag, who: Actor) -> Flag:
        service.edit(lambda d: {**d, "spoof_detection": body.value}, who, "spoof detection")
        return spoof()


def config_routes(router: APIRouter, service: ConfigService) -> None:
    _lifecycle_routes(router, service)
    _object_routes(router, service)
