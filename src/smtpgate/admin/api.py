"""The REST API (FastAPI): the configuration lifecycle, the queue, policy tools.

Every request carries ``Authorization: Bearer <token>`` (tokens are made with
``smtpgate admin token create`` and kept hashed); every change is written to
the audit log under the token's name. Edits go to the draft; ``POST
/config/apply`` makes them current. Errors are JSON: ``{"detail": sentence,
"problems": [{"path", "message"}]}``; 422 for an invalid configuration or
request, 404 for something that does not exist, 409 for a conflicting store
state, 401 without a valid token. No reply carries a stack trace or a secret
in clear (secrets are ``enc:v1:`` tokens, see ``smtpgate.config.schema``).

The API runs in its own thread with its own event loop (:class:`ApiServer`),
so a slow request never holds up an SMTP session.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from smtpgate.admin import edit
from smtpgate.admin.operations import (
    explain_policy,
    message_dict,
    queue_act,
    queue_list,
    queue_show,
    send_credentials,
)
from smtpgate.admin.services import ConfigService, authenticate
from smtpgate.config.document import Document
from smtpgate.config.load import field_path, parse_config
from smtpgate.config.schema import (
    AdminSettings,
    Certificate,
    ConnectionProfile,
    DefaultProfile,
    GatewaySettings,
    Limits,
    Listener,
    Namespace,
    QueueSettings,
    SendConnector,
    SpamSettings,
    Timeouts,
    TlsSettings,
    parse_duration,
)
from smtpgate.config.secret import encrypt, load_key
from smtpgate.delivery.verify import verify_connector
from smtpgate.errors import AdminError, ConfigError, Conflict, FieldProblem, NotFound
from smtpgate.gateway import GatewayPolicy
from smtpgate.observe.log import get_logger
from smtpgate.policy.explain import Facts
from smtpgate.queue.store import Filters, QueueStore

log = get_logger("smtpgate.admin.api")

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
}


@dataclass
class ApiContext:
    """What the API works on; ``status`` is the running gateway's own view."""

    service: ConfigService
    status: Callable[[], dict[str, Any]]


# -- request bodies ------------------------------------------------------------


class StrictBody(BaseModel):
    """Request bodies are strict: ``0`` is not ``false`` and ``"1"`` is not 1."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Value(StrictBody):
    value: str = Field(min_length=1, max_length=1000)


class Flag(StrictBody):
    value: bool


class ApplyRequest(StrictBody):
    comment: str = Field(default="", max_length=1000)


class RollbackRequest(StrictBody):
    revision: int = Field(ge=1)
    force: bool = False


class ImportRequest(StrictBody):
    document: dict[str, Any]
    force: bool = False


def _ip_address(value: str) -> str:
    return str(ipaddress.ip_address(value))  # ValueError: "does not appear to be an IP"


class ExplainRequest(StrictBody):
    client_ip: Annotated[str, AfterValidator(_ip_address)] = Field(max_length=100)
    confirmed_names: list[str] = Field(default_factory=list, max_length=20)
    helo: str | None = Field(default=None, max_length=255)
    sender: str | None = Field(default=None, max_length=512)
    recipients: list[str] = Field(default_factory=list, max_length=100)
    tls: bool = False
    auth_user: str | None = Field(default=None, max_length=255)
    client_certificate: str | None = Field(default=None, max_length=1000)


class Secret(StrictBody):
    value: str = Field(min_length=1, max_length=4096)


# -- errors --------------------------------------------------------------------


class Problem(BaseModel):
    path: str
    message: str


class ErrorBody(BaseModel):
    """Every error reply: a sentence, and the fields at fault when there are any."""

    detail: str
    problems: list[Problem] = Field(default_factory=list)


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the request cannot be done as asked"},
    401: {"model": ErrorBody, "description": "no valid API token"},
    404: {"model": ErrorBody, "description": "no such object, revision or message"},
    409: {"model": ErrorBody, "description": "conflicts with the store's state (draft)"},
    422: {"model": ErrorBody, "description": "invalid request or resulting configuration"},
}


def _problems(problems: list[FieldProblem]) -> list[dict[str, str]]:
    return [{"path": p.path, "message": p.message} for p in problems]


def _error(status: int, detail: str, problems: list[FieldProblem] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "problems": _problems(problems or [])}, status)


def _allowed(request: Request) -> list[str]:
    """The methods of every route at this path (Starlette names only the first's)."""
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _request_problem(error: Any) -> FieldProblem:
    """``relay``, ``client_hosts[0]`` for the body (as in a configuration file);
    ``query.older_than`` or ``path.action`` for the other parts of a request."""
    where, *rest = error["loc"]
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown setting (check the spelling in docs/configuration.md)"
    if where == "body":
        return FieldProblem(field_path(tuple(rest)) or "body", message)
    return FieldProblem(".".join(str(part) for part in error["loc"]), message)


def _install_error_handlers(app: FastAPI) -> None:
    async def config_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ConfigError)
        return _error(422, "the configuration would be invalid", exc.problems)

    async def request_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [_request_problem(e) for e in exc.errors()]
        return _error(422, "the request is invalid", problems)

    async def admin_error(_request: Request, exc: Exception) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
        return _error(status, str(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # RFC 9110 §15.5.6: every method the resource has
            response.headers["Allow"] = ", ".join(_allowed(request))
        return response

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("API request failed", error=repr(exc))
        return _error(500, f"internal error ({type(exc).__name__}); see the gateway's log")

    app.add_exception_handler(ConfigError, config_error)
    app.add_exception_handler(RequestValidationError, request_error)
    app.add_exception_handler(AdminError, admin_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


# -- the application -----------------------------------------------------------


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="smtpgate",
        version="1",
        description="Configuration, queue and policy tools of an smtpgate gateway.",
    )
    _install_error_handlers(app)
    app.state.context = context

    async def unauthorised(_request: Request, _exc: Exception) -> JSONResponse:
        response = _error(401, "a valid API token is needed (Authorization: Bearer ...)")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    app.add_exception_handler(_Unauthorised, unauthorised)
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_actor)], responses=ERRORS)
    _lifecycle_routes(router, context)
    _object_routes(router, context)
    _operation_routes(router, context)
    app.include_router(router)
    return app


class _Unauthorised(Exception):  # noqa: N818 - mapped to 401
    pass


_bearer = HTTPBearer(auto_error=False)


def require_actor(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The audit log's name for the caller: ``token:<name>``; 401 without a token."""
    context: ApiContext = request.app.state.context
    name = authenticate(context.service.store, credentials.credentials if credentials else "")
    if name is None:
        raise _Unauthorised
    return f"token:{name}"


Actor = Annotated[str, Depends(require_actor)]


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


def _lifecycle_routes(router: APIRouter, context: ApiContext) -> None:
    service = context.service

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
        from smtpgate.config.document import restart_required  # noqa: PLC0415

        changes = service.diff()
        return {
            "changes": [c.as_dict() for c in changes],
            "restart_required": restart_required(changes),
        }

    @router.post("/config/validate", tags=["config"])
    def validate() -> dict[str, Any]:
        problems = service.validate()
        return {"valid": not problems, "problems": _problems(problems)}

    @router.post("/config/apply", tags=["config"])
    def apply(request: ApplyRequest, who: Actor) -> dict[str, Any]:
        return service.apply(who, request.comment).as_dict()

    @router.get("/config/history", tags=["config"])
    def history() -> list[dict[str, Any]]:
        return [
            {
                "revision": r.number,
                "applied_at": r.applied_at,
                "applied_by": r.applied_by,
                "comment": r.comment,
            }
            for r in service.history()
        ]

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
        return [
            {"at": e.at, "actor": e.actor, "action": e.action, "detail": e.detail}
            for e in service.store.audit_log(limit)
        ]


def _object_routes(router: APIRouter, context: ApiContext) -> None:
    for collection, model in COLLECTION_MODELS.items():
        _collection_routes(router, context.service, collection, model)
    for section, model in SECTION_MODELS.items():
        _section_routes(router, context.service, section, model)
    for collection, field in sorted(edit.ITEM_LISTS):
        if field != "namespaces":
            _value_routes(router, context.service, collection, field)
    _namespace_routes(router, context.service)
    _domain_routes(router, context.service)


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


def _operation_routes(router: APIRouter, context: ApiContext) -> None:
    service = context.service
    queue_dir = service.data_dir / "queue"

    def applied_config() -> Any:
        return parse_config(service.applied().document)

    def with_queue(work: Callable[[QueueStore], Any]) -> Any:
        store = QueueStore(queue_dir)
        try:
            return work(store)
        finally:
            store.close()

    @router.get("/status", tags=["operations"])
    def status() -> dict[str, Any]:
        return context.status()

    @router.get("/queue", tags=["queue"])
    def listing(
        state: Literal["queued", "deferred", "held", "bounce"] | None = None,
        sender: str | None = None,
        recipient: str | None = None,
        domain: str | None = None,
        older_than: str | None = None,
    ) -> list[dict[str, Any]]:
        try:
            older = parse_duration(older_than) if older_than else None
        except ValueError as exc:
            raise ConfigError([FieldProblem("older_than", str(exc))]) from None
        filters = Filters(state, sender, recipient, domain, older)
        return [message_dict(m) for m in with_queue(lambda s: queue_list(s, filters))]

    @router.get("/queue/{message_id}", tags=["queue"])
    def show(message_id: str) -> dict[str, Any]:
        return message_dict(with_queue(lambda s: queue_show(s, message_id)))

    @router.post("/queue/{message_id}/{action}", tags=["queue"])
    def act(
        message_id: str, action: Literal["retry", "hold", "release", "bounce"]
    ) -> dict[str, Any]:
        result: dict[str, Any] = with_queue(lambda s: queue_act(s, action, message_id))
        return result

    @router.delete("/queue/{message_id}", tags=["queue"])
    def delete(message_id: str) -> dict[str, Any]:
        result: dict[str, Any] = with_queue(lambda s: queue_act(s, "delete", message_id))
        return result

    @router.post("/queue-retry-all", tags=["queue"])
    def retry_all() -> dict[str, Any]:
        result: dict[str, Any] = with_queue(lambda s: queue_act(s, "retry", None))
        return result

    @router.post("/policy/explain", tags=["operations"])
    def explain(request: ExplainRequest) -> dict[str, Any]:
        facts = Facts(**request.model_dump())
        result: dict[str, Any] = explain_policy(applied_config(), facts).as_dict()
        return result

    @router.post("/connectors/{name}/verify", tags=["operations"])
    async def verify(name: str, domain: str | None = None) -> list[dict[str, Any]]:
        config = applied_config()
        connector = next((c for c in config.send_connectors if c.name == name), None)
        if connector is None:
            raise NotFound(f"no send connector named {name!r}")
        password = GatewayPolicy.build(config).smarthost_password(connector)
        steps = await verify_connector(config, connector, password, domain)
        return [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in steps]

    @router.post("/profiles/{name}/send-credentials", tags=["operations"])
    def credentials(name: str) -> dict[str, str]:
        config = applied_config()
        result: dict[str, str] = with_queue(lambda s: send_credentials(config, s, name))
        return result

    @router.post("/secrets/encrypt", tags=["operations"])
    def encrypt_secret(body: Secret) -> dict[str, str]:
        return {"value": encrypt(load_key(service.data_dir, create=True), body.value)}


# -- the server thread -----------------------------------------------------------


class ApiServer:
    """uvicorn in a thread of its own, with its own event loop."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="smtpgate-api", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError("the admin API could not start listening (see admin.listen)")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    @property
    def port(self) -> int:
        servers = self.server.servers
        sockets = servers[0].sockets if servers else []
        return int(sockets[0].getsockname()[1]) if sockets else 0
