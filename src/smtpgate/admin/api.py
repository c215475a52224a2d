"""The REST API (FastAPI): the configuration lifecycle, the queue, policy tools.

Every request carries ``Authorization: Bearer <token>`` (tokens are made with
``smtpgate admin token create`` and kept hashed); every change is written to
the audit log under the token's name. Edits go to the draft; ``POST
/config/apply`` makes them current. Errors are JSON: ``{"detail": sentence,
"problems": [{"path", "message"}]}``; 422 for an invalid configuration or
request, 404 for something that does not exist, 409 for a conflicting store
state, 401 without a valid token. No reply carries a stack trace or a secret
in clear (secrets are ``enc:v1:`` tokens, see ``smtpgate.config.schema``).

The API runs in a process of its own (:func:`run_api`, started by ``smtpgate
serve``), so admin traffic never takes CPU time from SMTP sessions. It talks
to the gateway only through the store: an applied revision is noticed by the
gateway within a second, and the gateway publishes its running state there. The routes live in
``routes_config`` and ``routes_ops``; what they share, in ``http``.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from smtpgate.admin.console.app import console_routes, error_page, install_handlers
from smtpgate.admin.guard import Guard, StoreUnreachable, guarded
from smtpgate.admin.http import ERRORS, bearer, problems
from smtpgate.admin.routes_config import config_routes
from smtpgate.admin.routes_ops import operation_routes
from smtpgate.admin.routes_quarantine import quarantine_routes
from smtpgate.admin.routes_tlsrpt import tlsrpt_routes
from smtpgate.admin.routes_trace import health_routes, trace_routes
from smtpgate.admin.services import ConfigService, authenticate
from smtpgate.config import parse_config
from smtpgate.config.load import field_path
from smtpgate.config.schema import GatewayConfig, parse_listen_address
from smtpgate.config.secret import load_key
from smtpgate.config.store import ConfigStore
from smtpgate.errors import AdminError, ConfigError, Conflict, FieldProblem, NotFound
from smtpgate.observe.log import get_logger
from smtpgate.tls.certificates import load as load_certificate
from smtpgate.tls.context import server_context

log = get_logger("smtpgate.admin.api")


def _error(status: int, detail: str, found: list[FieldProblem] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "problems": problems(found or [])}, status)


def _reply(
    request: Request, status: int, detail: str, found: list[FieldProblem] | None = None
) -> Response:
    """JSON for the API; for the console's pages, a page a browser shows."""
    if guarded(request.url.path):
        return _error(status, detail, found)
    return error_page(request, status, detail)


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
    async def config_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConfigError)
        return _reply(request, 422, "the configuration would be invalid", exc.problems)

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = [_request_problem(e) for e in exc.errors()]
        return _reply(request, 422, "the request is invalid", problems)

    async def admin_error(request: Request, exc: Exception) -> Response:
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
        return _reply(request, status, str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        response = _reply(request, exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # RFC 9110 §15.5.6: every method the resource has
            response.headers["Allow"] = ", ".join(_allowed(request))
        return response

    async def unreachable(request: Request, exc: Exception) -> Response:
        return _reply(request, 503, store_down(exc))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("API request failed", error=repr(exc))
        return _reply(request, 500, f"internal error ({type(exc).__name__}); see the gateway's log")

    app.add_exception_handler(ConfigError, config_error)
    app.add_exception_handler(RequestValidationError, request_error)
    app.add_exception_handler(AdminError, admin_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(DBAPIError, unreachable)
    app.add_exception_handler(Exception, unexpected)


def store_down(exc: Exception) -> str:
    """What a client is told while the configuration store does not answer."""
    reason = str(exc) if isinstance(exc, AdminError) else str(getattr(exc, "orig", exc) or exc)
    reason = reason.strip().splitlines()[0] if reason.strip() else type(exc).__name__
    return f"the configuration store is unreachable ({reason}); try again when it answers"


def _token_name(service: ConfigService, token: str) -> str | None:
    try:
        return authenticate(service.store, token)
    except (DBAPIError, AdminError) as exc:
        raise StoreUnreachable(store_down(exc)) from None


# -- the application -----------------------------------------------------------


def create_app(service: ConfigService, clock: Callable[[], float] = time.time) -> FastAPI:
    """The API and the console; ``clock`` times the console's sessions and logins."""
    app = FastAPI(
        title="smtpgate",
        version="1",
        description="Configuration, queue and policy tools of an smtpgate gateway.",
    )
    _install_error_handlers(app)
    app.add_middleware(Guard, token_name=lambda token: _token_name(service, token))
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(bearer)], responses=ERRORS)
    config_routes(router, service)
    operation_routes(router, service)
    quarantine_routes(router, service)
    trace_routes(router, service)
    tlsrpt_routes(router, service)
    app.include_router(router)
    health_routes(app, service, lambda token: _token_name(service, token))
    install_handlers(app)
    console_routes(app, service, clock)
    return app


# -- the server process ----------------------------------------------------------


def run_api(
    data_dir: Path, listen: str, fd: int | None = None, certificate: str | None = None
) -> None:
    """Serve the API on ``listen`` until SIGTERM (uvicorn in this process's main
    thread). ``smtpgate serve`` runs this in a child process, handing over the
    socket it bound (``fd``); the child leaves when its parent does, so a killed
    gateway never leaves an orphan holding the port. ``certificate`` (the name
    of a ``certificates`` entry of the applied configuration): HTTPS with it,
    TLS 1.2 or later; none: plain HTTP."""
    store = ConfigStore.open(data_dir)
    service = ConfigService(store, data_dir)
    host, port = parse_listen_address(listen)
    _leave_with_parent()
    log.info("admin API starting", address=listen, https=certificate is not None)
    config = uvicorn.Config(
        create_app(service), host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    config.load()  # uvicorn builds its SSL context only from files: ours replaces it
    if certificate is not None:
        applied = parse_config(service.applied().document)
        config.ssl = admin_tls_context(applied, data_dir, certificate)
    sockets = [socket.socket(fileno=fd)] if fd is not None else None
    uvicorn.Server(config).run(sockets=sockets)


def admin_tls_context(config: GatewayConfig, data_dir: Path, name: str) -> ssl.SSLContext:
    """The server context of ``admin.certificate``: the certificate of that name
    in ``config`` (PEM, or PKCS#12 with its PIN kept under ``data_dir``'s key),
    TLS 1.2 and 1.3."""
    for index, entry in enumerate(config.certificates):
        if entry.name == name:
            key = load_key(data_dir, create=False) if entry.pin is not None else None
            loaded = load_certificate(entry, f"certificates[{index}]", key)
            if loaded.key_pem is None:
                raise ConfigError(
                    [FieldProblem("admin.certificate", f"certificate {name!r} has no private key")]
                )
            return server_context(loaded, ("TLSv1.2", "TLSv1.3"))
    raise ConfigError([FieldProblem("admin.certificate", f"no certificate named {name!r}")])


def _leave_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


__all__ = ["admin_tls_context", "create_app", "run_api"]
