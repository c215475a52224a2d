"""Console page: send connectors.

A list, and one page per connector with every setting of ``SendConnector``:
delivery by smarthost (with SMTP AUTH credentials; the password is encrypted
with the cluster key as ``/secrets/encrypt`` does and never shown again) or by
DNS MX, security, client identity, cost, gateway roles, failover, and the
namespace editor (sender/recipient patterns with ``*`` and ``?``). *Verify*
runs the same checks as ``smtpgate connector verify`` against the applied
configuration. Edits go to the draft through the shared edit helpers.
The list ends with *Connector status*: each connector's health per
destination as the running gateway last wrote it (``delivery/health.py``).
"""

import copy
import time
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from smtpgate.admin import edit
from smtpgate.admin.console.app import Console, changer, field_errors, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.keys import encryption_key
from smtpgate.config.load import parse_config
from smtpgate.config.secret import encrypt
from smtpgate.delivery.health import read_status, status_table
from smtpgate.delivery.verify import verify_connector
from smtpgate.errors import AdminError, ConfigError, Conflict, NotFound
from smtpgate.snapshot import Snapshot

COLLECTION = "send_connectors"
SECURITY = ["starttls", "require-starttls", "implicit-tls", "none"]
SECURITY_HELP = {
    "starttls": "TLS when the next hop offers it, plaintext otherwise",
    "require-starttls": "no STARTTLS or a failed handshake defers the message (4.7.5); "
    "never plaintext",
    "implicit-tls": "TLS from the first byte (port 465 style)",
    "none": "plaintext; a password would go in clear",
}
DEFAULT = {
    "name": "",
    "roles": [],
    "deliver": {"smarthost": {"host": "", "port": 25}},
    "security": "starttls",
    "cost": 10,
    "namespaces": [{"sender": "*", "recipient": "*"}],
    "failover_when_unreachable": False,
    "client_certificate": None,
}


def _health(console: Console) -> list[dict[str, Any]]:
    """The status rows of the applied configuration's connectors."""
    try:
        config = parse_config(console.service.applied().document)
    except (ConfigError, NotFound):
        return []
    names = [c.name for c in config.send_connectors]
    rows = status_table(read_status(console.service.data_dir), names)
    for row in rows:
        for key in ("last_success", "last_error_at"):
            value = row.get(key)
            row[key] = (
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
                if isinstance(value, (int, float))
                else "-"
            )
    return rows


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    @router.get("/connectors", response_class=HTMLResponse)
    def listing(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        connectors = edit.items(service.working()[0], COLLECTION)
        return console.render(
            request, "connectors.html", session,
            connectors=sorted(connectors, key=lambda c: (c.get("cost", 10), c.get("name", ""))),
            flash=_flash(request),
            health=_health(console),
        )  # fmt: skip

    @router.get("/connectors/new", response_class=HTMLResponse)
    def new(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return page(console, request, session, _copy(DEFAULT), original=None)

    @router.post("/connectors/new", response_class=HTMLResponse)
    async def create(request: Request, session: Annotated[Session, Depends(change)]) -> Response:
        return await save_form(request, session, None)

    @router.get("/connectors/{name}", response_class=HTMLResponse)
    def show(request: Request, name: str, session: Annotated[Session, Depends(see)]) -> Response:
        try:
            body = edit.get_item(service.working()[0], COLLECTION, name)
        except NotFound as exc:
            return console.render(request, "connectors.html", session, 404, error=str(exc))
        return page(console, request, session, _filled(body), original=name, flash=_flash(request))

    @router.post("/connectors/{name}", response_class=HTMLResponse)
    async def save(
        request: Request, name: str, session: Annotated[Session, Depends(change)]
    ) -> Response:
        return await save_form(request, session, name)

    async def save_form(request: Request, session: Session, name: str | None) -> Response:
        """Add (``name`` None) or replace the connector; the form again with each
        problem next to its field (422), or back to the connector's page."""
        form = await request.form()
        document = service.working()[0]
        names = [c.get("name") for c in edit.items(document, COLLECTION)]
        if name is not None and name not in names:
            return console.render(
                request, "connectors.html", session, 404, error=f"no send connector named {name!r}"
            )
        current = edit.get_item(document, COLLECTION, name) if name is not None else None
        body, errors = _from_form(form, current, console)
        if form.get("action") == "add-namespace":
            body["namespaces"].append({"sender": "", "recipient": ""})
            return page(console, request, session, _shown(body), original=name)
        if errors:
            return page(
                console, request, session, _shown(body), original=name, status=422, errors=errors
            )
        index = names.index(name) if name is not None else len(names)
        what = f"send connector {name or body['name']}"
        try:
            if name is None:
                service.edit(lambda d: edit.add_item(d, COLLECTION, body), session.user.actor, what)
            else:
                service.edit(
                    lambda d: edit.replace_item(d, COLLECTION, name, body), session.user.actor, what
                )
        except ConfigError as exc:
            errors = field_errors(exc.problems, f"{COLLECTION}[{index}]")
            return page(
                console, request, session, _shown(body), original=name, status=422, errors=errors
            )
        except (Conflict, AdminError) as exc:
            errors = {"name": [str(exc)]}
            return page(
                console, request, session, _shown(body), original=name, status=422, errors=errors
            )
        return _back(body["name"], "saved to the draft")

    _action_routes(router, console)


def _action_routes(router: APIRouter, console: Console) -> None:
    """Verify and delete."""
    see, change = viewer(console), changer(console)
    service = console.service

    @router.post("/connectors/{name}/verify", response_class=HTMLResponse)
    async def verify(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        domain: Annotated[str, Form(max_length=255)] = "",
    ) -> Response:
        try:
            body = edit.get_item(service.working()[0], COLLECTION, name)
        except NotFound as exc:
            return console.render(request, "connectors.html", session, 404, error=str(exc))
        steps, error = await _verify(console, name, domain.strip() or None)
        return page(
            console, request, session, _filled(body), original=name,
            steps=steps, verify_error=error, domain=domain,
        )  # fmt: skip

    @router.get("/connectors/{name}/delete", response_class=HTMLResponse)
    def confirm(request: Request, name: str, session: Annotated[Session, Depends(see)]) -> Response:
        try:
            edit.get_item(service.working()[0], COLLECTION, name)
        except NotFound as exc:
            return console.render(request, "connectors.html", session, 404, error=str(exc))
        return console.render(request, "connector_delete.html", session, name=name)

    @router.post("/connectors/{name}/delete", response_class=HTMLResponse)
    async def delete(
        request: Request, name: str, session: Annotated[Session, Depends(change)]
    ) -> Response:
        try:
            service.edit(
                lambda d: edit.delete_item(d, COLLECTION, name),
                session.user.actor,
                f"send connector {name}",
            )
        except (ConfigError, AdminError) as exc:
            message = str(exc)
            if isinstance(exc, ConfigError):
                message = "; ".join(f"{p.path}: {p.message}" for p in exc.problems)
            return console.render(
                request, "connector_delete.html", session, 422, name=name, error=message
            )
        return RedirectResponse(
            "/connectors?done=" + quote(f"send connector {name} deleted in the draft"),
            status_code=303,
        )


def page(  # noqa: PLR0913 - the form's parts
    console: Console,
    request: Request,
    session: Session,
    body: dict[str, Any],
    *,
    original: str | None,
    status: int = 200,
    **extra: Any,
) -> HTMLResponse:
    """The connector's form (a new one when ``original`` is None)."""
    document = console.service.working()[0]
    certificates = [c.get("name", "") for c in document.get("certificates", [])]
    return console.render(
        request, "connector.html", session, status,
        connector=body, original=original, certificates=certificates,
        security_options=SECURITY, security_help=SECURITY_HELP,
        errors=extra.pop("errors", {}), **extra,
    )  # fmt: skip


async def _verify(
    console: Console, name: str, domain: str | None
) -> tuple[list[dict[str, Any]], str]:
    """The steps of ``connector verify`` (on the applied configuration, as the API)."""
    try:
        config = parse_config(console.service.applied().document)
        connector = next((c for c in config.send_connectors if c.name == name), None)
        if connector is None:
            return [], (
                f"send connector {name!r} is not in the applied configuration yet; "
                "apply the pending changes first"
            )
        password = Snapshot.compile(config, certificates=False).smarthost_password(connector)
        steps = await verify_connector(config, connector, password, domain)
    except (AdminError, ConfigError, OSError) as exc:
        return [], str(exc)
    return [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in steps], ""


# -- the form ------------------------------------------------------------------------


def _from_form(
    form: FormData, current: dict[str, Any] | None, console: Console
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The connector the form describes, and problems found before the schema
    sees it (a password that could not be encrypted). A blank password keeps
    the stored one; the stored one is never sent to the browser."""
    problems: dict[str, list[str]] = {}
    body: dict[str, Any] = {
        "name": _text(form, "name"),
        "roles": _lines(_text(form, "roles")),
        "security": _text(form, "security") or "starttls",
        "cost": _number(_text(form, "cost")),
        "namespaces": _namespaces(form),
        "failover_when_unreachable": _checked(form, "failover_when_unreachable"),
        "client_certificate": _text(form, "client_certificate") or None,
    }
    if _text(form, "deliver") == "dns":
        body["deliver"] = {"dns": {"port": _number(_text(form, "dns_port") or "25")}}
        return body, problems
    smarthost: dict[str, Any] = {
        "host": _text(form, "host"),
        "port": _number(_text(form, "port") or "25"),
    }
    username = _text(form, "username")
    stored = ((current or {}).get("deliver") or {}).get("smarthost") or {}
    password_file = _text(form, "password_file")
    typed = str(form.get("password") or "")
    keep = bool(username) and not password_file and not _checked(form, "clear_password")
    if username:
        smarthost["username"] = username
    if typed:  # without a user name too: the schema then says they go together
        try:
            key = encryption_key(console.service.store, console.service.data_dir)
            smarthost["password"] = encrypt(key, typed)
        except (AdminError, OSError, ValueError) as exc:
            message = f"the password could not be encrypted: {exc}"
            problems["deliver.smarthost.password"] = [message]
    elif keep and stored.get("password"):  # removing the user name drops it
        smarthost["password"] = stored["password"]
    if password_file:
        smarthost["password_file"] = password_file
    body["deliver"] = {"smarthost": smarthost}
    return body, problems


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _checked(form: FormData, name: str) -> bool:
    values = form.getlist(name)  # the hidden "false", then the box's "true" if ticked
    return bool(values) and values[-1] == "true"


def _lines(text: str) -> list[str]:
    return [part.strip() for part in text.replace(",", "\n").splitlines() if part.strip()]


def _number(text: str) -> Any:
    """An integer when it is one; else the text, for the schema to name the problem."""
    try:
        return int(text)
    except ValueError:
        return text


def _namespaces(form: FormData) -> list[dict[str, str]]:
    """The rows of the namespace editor, without blank and removed ones."""
    senders, recipients = form.getlist("ns_sender"), form.getlist("ns_recipient")
    removed = {str(v) for v in form.getlist("ns_remove")}
    rows = []
    for i, (sender, recipient) in enumerate(zip(senders, recipients, strict=False)):
        s, r = str(sender).strip(), str(recipient).strip()
        if str(i) in removed or (not s and not r):
            continue
        rows.append({"sender": s or "*", "recipient": r or "*"})
    return rows


def _copy(body: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(body)


def _filled(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored connector with every field the form shows (the password as a flag)."""
    body = {**_copy(DEFAULT), **_copy(stored)}
    return _shown(body)


def _shown(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` for the form: the password replaced by whether one is stored."""
    out = _copy(body)
    smarthost = (out.get("deliver") or {}).get("smarthost")
    if isinstance(smarthost, dict):
        smarthost["has_password"] = bool(smarthost.pop("password", None))
    return out


def _flash(request: Request) -> str:
    return request.query_params.get("done", "")[:200]


def _back(name: str, what: str) -> Response:
    return RedirectResponse(
        f"/connectors/{quote(name, safe='')}?done=" + quote(f"send connector {name}: {what}"),
        status_code=303,
    )
