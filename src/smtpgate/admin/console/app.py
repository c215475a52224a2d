"""The web console: server-rendered pages on the same services as the API.

Mounted at ``/`` by the admin process's FastAPI app (the API stays under
``/api/v1`` with its tokens). Pages are Jinja2 templates with htmx (vendored
in ``static/``) for partial updates; every form also works as a plain POST.
A page module registers its routes with ``routes(router, console)``; the
``Console`` holds what they share: the configuration service, the sessions,
the templates, the clock.

Every page needs a session (else: to the login page); every POST needs the
session's CSRF token and, unless it only reads, the *admin* role (an
*auditor* gets 403). Changes are made as the user (``user:NAME`` in the
audit log) and go to the draft; the *Changes Made* panel applies them.

No ``from __future__ import annotations`` in page modules: FastAPI reads
the ``Annotated[Session, Depends(see)]`` parameters at definition time, and
``see`` is local to the function that registers the routes.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from smtpgate.admin import accounts, nodes
from smtpgate.admin.accounts import LoginThrottle, User
from smtpgate.admin.console.sessions import COOKIE, Session, Sessions
from smtpgate.admin.services import ConfigService
from smtpgate.errors import AdminError, ConfigError, Conflict, FieldProblem

HERE = Path(__file__).parent

# The navigation, in the order of the manuals' tasks.
NAVIGATION = [
    ("Dashboard", "/"),
    ("Connection profiles", "/profiles"),
    ("Send connectors", "/connectors"),
    ("Hosted domains", "/domains"),
    ("Listeners", "/listeners"),
    ("TLS", "/tls"),
    ("Settings", "/settings"),
    ("Certificates", "/certificates"),
    ("Queue", "/queue"),
    ("Quarantine", "/quarantine"),
    ("Tracking", "/tracking"),
    ("Policy explain", "/explain"),
    ("Peers", "/peers"),
    ("History", "/history"),
    ("Audit log", "/audit"),
]


@dataclass
class Console:
    """What every page shares."""

    service: ConfigService
    clock: Callable[[], float] = time.time
    sessions: Sessions = field(default_factory=Sessions)
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    templates: Jinja2Templates = field(
        default_factory=lambda: Jinja2Templates(directory=str(HERE / "templates"))
    )

    def pending(self) -> int:
        """How many changes the draft holds (the *Changes Made* count)."""
        try:
            return len(self.service.diff())
        except Exception:
            return 0

    def render(
        self,
        request: Request,
        template: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        context = {
            "request": request,
            "session": session,
            "user": session.user if session else None,
            "csrf": session.csrf if session else "",
            "navigation": NAVIGATION,
            "pending": self.pending() if session else 0,
            "path": request.url.path,
            **context,
        }
        return self.templates.TemplateResponse(request, template, context, status_code=status)


def problems_by_field(exc: ConfigError) -> dict[str, list[str]]:
    """Each problem under its field path, for showing next to the field."""
    found: dict[str, list[str]] = {}
    for problem in exc.problems:
        found.setdefault(problem.path, []).append(problem.message)
    return found


def console_routes(
    app: FastAPI, service: ConfigService, clock: Callable[[], float] = time.time
) -> Console:
    """Mount the console on ``app``; returns it (tests reach its sessions)."""
    console = Console(service, clock)
    app.middleware("http")(_security_headers)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    router = APIRouter(include_in_schema=False)
    _login_routes(router, console)
    _home_routes(router, console)
    from smtpgate.admin.console import pages  # noqa: PLC0415 - every page module

    for register in pages.ALL:
        register(router, console)
    app.include_router(router)
    return console


# What a browser is told about every console page: only our own scripts and styles
# (htmx is vendored), never inside a frame (clickjacking), no MIME sniffing, no
# Referer to elsewhere, and no caching of pages that show the configuration.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def _security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
    response: Response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# -- who is asking -----------------------------------------------------------------


class LoginRequired(Exception):  # noqa: N818 - a redirect, not an error
    """Raised by a page without a session: the handler sends the login page."""


def viewer(console: Console) -> Callable[[Request], Session]:
    """A dependency: the session of a logged-in user (any role)."""

    def current(request: Request) -> Session:
        session = console.sessions.get(request.cookies.get(COOKIE), console.clock())
        if session is None:
            raise LoginRequired
        found = console.service.store.user(session.user.name)  # deleted, new password, role
        if found is None or found[1] != session.credential:
            console.sessions.drop(session.token)
            raise LoginRequired
        if found[2] != session.user.role:
            session.user = User(session.user.name, accounts.role_of(found[2]))
        return session

    return current


def changer(console: Console) -> Callable[..., Any]:
    """A dependency for a POST that changes something: a session with the admin
    role and the session's CSRF token (form field ``csrf`` or ``X-CSRF-Token``)."""
    see = viewer(console)

    async def current(request: Request) -> Session:
        session = see(request)
        await check_csrf(request, session)
        if not session.user.may_change:
            raise HTTPException(403, "your role (auditor) may only read")
        return session

    return current


async def check_csrf(request: Request, session: Session) -> None:
    offered = request.headers.get("x-csrf-token")
    if offered is None:
        form = await request.form()
        value = form.get("csrf")
        offered = value if isinstance(value, str) else None
    if not session.csrf_ok(offered):
        raise HTTPException(
            403, "the form is missing its CSRF token or it is stale; reload the page"
        )


_pages = Jinja2Templates(directory=str(HERE / "templates"))


def error_page(request: Request, status: int, detail: str) -> HTMLResponse:
    """An error on a console page, as a page (the API answers JSON)."""
    context = {"status": status, "detail": detail, "navigation": [], "pending": 0}
    return _pages.TemplateResponse(request, "error.html", context, status_code=status)


def install_handlers(app: FastAPI) -> None:
    """A page without a session goes to the login page; htmx follows with HX-Redirect."""

    async def to_login(request: Request, _exc: Exception) -> Response:
        if request.headers.get("hx-request"):
            return Response(status_code=204, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=303)

    app.add_exception_handler(LoginRequired, to_login)


# -- login, logout -------------------------------------------------------------------


def _login_routes(router: APIRouter, console: Console) -> None:
    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> HTMLResponse:
        return console.render(request, "login.html", None)

    @router.post("/login", response_class=HTMLResponse)
    async def login(
        request: Request,
        username: Annotated[str, Form(max_length=64)] = "",
        password: Annotated[str, Form(max_length=1024)] = "",
    ) -> Response:
        ip = request.client.host if request.client else "unknown"
        now = console.clock()
        if console.throttle.locked(ip, now):
            message = "too many failed logins from your address; try again later"
            return console.render(request, "login.html", None, 429, error=message)
        user = await asyncio.to_thread(accounts.verify, console.service.store, username, password)
        if user is None:
            delay = console.throttle.failed(ip, now)
            await asyncio.sleep(delay)
            return console.render(
                request, "login.html", None, 401, error="wrong user name or password"
            )
        console.throttle.succeeded(ip)
        return _logged_in(request, console, user)

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        session = console.sessions.get(request.cookies.get(COOKIE), console.clock())
        if session is not None:
            await check_csrf(request, session)
            console.sessions.drop(session.token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


def _logged_in(request: Request, console: Console, user: User) -> Response:
    found = console.service.store.user(user.name)
    credential = found[1] if found else ""
    session = console.sessions.create(user, console.clock(), credential)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        session.token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


# -- dashboard and the Changes Made panel ---------------------------------------------


def _home_routes(router: APIRouter, console: Console) -> None:
    see, change = viewer(console), changer(console)
    service = console.service

    @router.get("/", response_class=HTMLResponse)
    def dashboard(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        from smtpgate.admin.console.dashboard import facts  # noqa: PLC0415

        return console.render(request, "dashboard.html", session, **facts(console))

    @router.get("/changes", response_class=HTMLResponse)
    def changes(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return console.render(request, "changes.html", session, **_changes(service))

    @router.post("/changes/apply", response_class=HTMLResponse)
    async def apply(
        request: Request,
        session: Annotated[Session, Depends(change)],
        comment: Annotated[str, Form(max_length=500)] = "",
        force: Annotated[bool, Form()] = False,
    ) -> HTMLResponse:
        try:
            result = await asyncio.to_thread(
                service.apply, session.user.actor, comment, force=force
            )
        except ConfigError as exc:
            return console.render(
                request, "changes.html", session, 422, **_changes(service), problems=exc.problems
            )
        except Conflict as exc:
            stale = "applied since" in str(exc)
            return console.render(
                request,
                "changes.html",
                session,
                409,
                **_changes(service),
                error=str(exc),
                stale=stale,
            )
        found = await asyncio.to_thread(nodes.wait_applied, service.store, result.revision, 10.0)
        report = nodes.apply_report(found)
        return console.render(
            request, "applied.html", session, revision=result.revision, report=report,
            changes=[c.text() for c in result.changes], restart=result.restart_required,
        )  # fmt: skip

    @router.post("/changes/discard")
    async def discard(session: Annotated[Session, Depends(change)]) -> Response:
        with contextlib.suppress(AdminError):  # nothing to discard: the page shows that
            service.discard(session.user.actor)
        return RedirectResponse("/changes", status_code=303)


def _changes(service: ConfigService) -> dict[str, Any]:
    draft = service.draft()
    applied = service.store.applied_number()
    report = service.diff_report()
    return {
        "changes": [c["text"] for c in report["changes"]],
        "restart_required": report["restart_required"],
        "draft": draft,
        "applied_number": applied,
        "stale_draft": draft is not None and draft.base_revision != applied,
    }


def field_errors(problems: list[FieldProblem], prefix: str) -> dict[str, list[str]]:
    """Problems under ``prefix`` (an object's path), keyed by the rest of the path."""
    found: dict[str, list[str]] = {}
    for problem in problems:
        if problem.path == prefix or problem.path.startswith((prefix + ".", prefix + "[")):
            rest = problem.path[len(prefix) :].lstrip(".")
            found.setdefault(rest, []).append(problem.message)
        else:
            found.setdefault("", []).append(f"{problem.path}: {problem.message}")
    return found
