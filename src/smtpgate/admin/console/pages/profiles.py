"""Console page: connection profiles (the manual's *Connections*).

The list with a *New profile* form, and one page per profile with a form per
part: name and notes, client hosts, sender domains, relay mode (with what each
mode means and whether its mail is spam-checked), inbound and outbound TLS,
SMTP AUTH and its users, *Send credentials*, and delete. Every form changes
the draft through ``console.service.edit`` with the pure helpers of
``smtpgate.admin.edit``, as the API and the CLI do; a problem comes back from
the service's checks and is shown under its field, in ``config check``'s words.
Passwords are encrypted with the cluster's key as ``/secrets/encrypt`` does and
never shown.
"""

import asyncio
import copy
import re
from collections.abc import Callable
from typing import Annotated, Any, get_args
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin import edit
from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.keys import encryption_key
from smtpgate.admin.operations import send_credentials
from smtpgate.admin.services import record
from smtpgate.config.document import Document
from smtpgate.config.load import notices, parse_config
from smtpgate.config.schema import TLS_ORDER, RelayMode
from smtpgate.config.secret import encrypt
from smtpgate.errors import AdminError, ConfigError, Conflict, FieldProblem, NotFound
from smtpgate.policy.relay import spam_checked
from smtpgate.queue.store import QueueStore

COLLECTION = "connection_profiles"
RELAY_MODES: tuple[RelayMode, ...] = get_args(RelayMode)
CIPHER_STRENGTHS = ("global", "high", "medium", "any")

# What each relay mode means (docs/configuration.md, the manual's relay control).
RELAY_HELP: dict[str, str] = {
    "none": "Accepts mail for the hosted domains only; nothing is relayed elsewhere. "
    "A sender address in a hosted domain is refused while spoof detection is on.",
    "full": "For your own mail servers: mail to any domain is accepted and relayed.",
    "restricted-external": "Outside hosts that may send to the hosted domains only.",
    "restricted-internal": "Internal hosts that may send to the hosted domains only.",
    "blocked": "Nothing is accepted: the client is refused at the greeting "
    "(554 5.7.1 Access denied).",
}

INDEX = re.compile(r"\[\d+\]")


def lines_of(text: str) -> list[str]:
    """The non-empty lines of a textarea, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def errors_under(problems: list[FieldProblem], prefix: str) -> dict[str, list[str]]:
    """Problems keyed by their field below ``prefix`` with list indexes dropped
    (``client_hosts[1]`` → ``client_hosts``); others under ``""``."""
    found: dict[str, list[str]] = {}
    for problem in problems:
        path = problem.path
        if path == prefix or path.startswith((prefix + ".", prefix + "[")):
            key = INDEX.sub("", path[len(prefix) :].lstrip(".")).lstrip(".")
            found.setdefault(key, []).append(problem.message)
        else:
            found.setdefault("", []).append(str(problem))
    return found


def relay_modes(check_outbound: bool) -> list[dict[str, Any]]:
    """Each mode with its meaning and whether its mail is spam-checked."""
    out = []
    for mode in RELAY_MODES:
        checked, why = spam_checked(mode, check_outbound)
        spam = "not applicable" if mode == "blocked" else ("yes" if checked else "no")
        out.append({"mode": mode, "help": RELAY_HELP[mode], "spam": spam, "why": why})
    return out


def summary(profile: dict[str, Any]) -> dict[str, Any]:
    outbound = profile.get("outbound_tls", {})
    auth = profile.get("smtp_auth", {})
    return {
        "name": profile["name"],
        "relay": profile.get("relay", "none"),
        "hosts": len(profile.get("client_hosts", [])),
        "sender_domains": profile.get("sender_domains", []),
        "tls_in": profile.get("inbound_tls", {}).get("mandatory", False),
        "tls_out": outbound.get("mandatory", False),
        "auth": auth.get("enabled", False),
        "users": len(auth.get("credentials", [])),
    }


def routes(router: APIRouter, console: Console) -> None:  # noqa: PLR0915 - one page's routes
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service
    notes_for: dict[str, list[str]] = {}  # session token → notices for the next page shown

    def working() -> Document:
        return service.working()[0]

    def position(document: Document, name: str) -> int:
        for i, item in enumerate(edit.items(document, COLLECTION)):
            if item.get("name") == name:
                return i
        raise NotFound(f"no connection profile named {name!r}")

    def listing(
        request: Request, session: Session, status: int = 200, **extra: Any
    ) -> HTMLResponse:
        profiles = [summary(p) for p in edit.items(working(), COLLECTION)]
        context: dict[str, Any] = {"profiles": profiles, "modes": RELAY_MODES, "found": {}}
        context["new"] = {"name": "", "client_hosts": [], "relay": "none"}
        context.update(extra)
        return console.render(request, "profiles.html", session, status, **context)

    def page(  # noqa: PLR0913, PLR0917 - a page with one form's state
        request: Request,
        session: Session,
        name: str,
        status: int = 200,
        form: str = "",
        found: dict[str, list[str]] | None = None,
        shown: dict[str, Any] | None = None,
        **extra: Any,
    ) -> HTMLResponse:
        document = working()
        profile = copy.deepcopy(edit.get_item(document, COLLECTION, name))
        profile.update(shown or {})
        check_outbound = bool(document.get("spam", {}).get("check_outbound", False))
        messages = notes_for.pop(session.token, [])
        return console.render(
            request, "profile.html", session, status,
            profile=profile, form=form, found=found or {}, modes=relay_modes(check_outbound),
            check_outbound=check_outbound, ciphers=CIPHER_STRENGTHS, versions=TLS_ORDER,
            notices=messages, **extra,
        )  # fmt: skip

    def save(  # noqa: PLR0913, PLR0917 - one form's save
        request: Request,
        session: Session,
        name: str,
        form: str,
        change_item: Callable[[dict[str, Any]], dict[str, Any]],
        shown: dict[str, Any] | None = None,
        what: str = "",
        **extra: Any,
    ) -> Response:
        """Replace profile ``name`` with ``change_item(profile)`` in the draft; on a
        problem the page again, the form's fields as typed, the problem under each."""
        document = working()
        try:
            index = position(document, name)
        except NotFound as exc:
            return listing(request, session, 404, error=str(exc))
        new_name = name

        def change(doc: Document) -> Document:
            nonlocal new_name
            item = change_item(copy.deepcopy(edit.get_item(doc, COLLECTION, name)))
            new_name = item["name"]
            return edit.replace_item(doc, COLLECTION, name, item)

        try:
            service.edit(change, session.user.actor, what or f"connection profile {name} ({form})")
        except ConfigError as exc:
            found = errors_under(exc.problems, f"{COLLECTION}[{index}]")
            return page(request, session, name, 422, form, found, shown, **extra)
        except AdminError as exc:
            return page(request, session, name, 409, form, {"": [str(exc)]}, shown, **extra)
        return RedirectResponse(f"/profiles/{quote(new_name)}#{form}", status_code=303)

    # -- the list and a new profile ------------------------------------------------

    @router.get("/profiles", response_class=HTMLResponse)
    def profiles(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return listing(request, session, flash="; ".join(notes_for.pop(session.token, [])))

    @router.post("/profiles", response_class=HTMLResponse)
    def create(
        request: Request,
        session: Annotated[Session, Depends(change)],
        name: Annotated[str, Form(max_length=200)] = "",
        client_hosts: Annotated[str, Form(max_length=100_000)] = "",
        relay: Annotated[str, Form(max_length=50)] = "none",
    ) -> Response:
        hosts, new_name = lines_of(client_hosts), name.strip()
        body: dict[str, Any] = {"name": new_name, "client_hosts": hosts, "relay": relay}
        index = len(edit.items(working(), COLLECTION))
        try:
            service.edit(
                lambda d: edit.add_item(d, COLLECTION, body),
                session.user.actor,
                f"add connection profile {new_name}",
            )
        except ConfigError as exc:
            found = errors_under(exc.problems, f"{COLLECTION}[{index}]")
            return listing(request, session, 422, found=found, new=body)
        except Conflict as exc:
            return listing(request, session, 422, found={"name": [str(exc)]}, new=body)
        converted = notices({COLLECTION: [{"client_hosts": hosts}]})
        notes_for[session.token] = [p.message for p in converted]
        return RedirectResponse(f"/profiles/{quote(new_name)}", status_code=303)

    # -- one profile -------------------------------------------------------------------

    @router.get("/profiles/{name}", response_class=HTMLResponse)
    def profile(
        request: Request, name: str, session: Annotated[Session, Depends(see)]
    ) -> HTMLResponse:
        try:
            return page(request, session, name)
        except NotFound as exc:
            return listing(request, session, 404, error=str(exc))

    @router.post("/profiles/{name}/general", response_class=HTMLResponse)
    def general(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        new_name: Annotated[str, Form(max_length=200)] = "",
        notes: Annotated[str, Form(max_length=10_000)] = "",
    ) -> Response:
        typed = {"name": new_name.strip(), "notes": notes}
        return save(request, session, name, "general", lambda p: {**p, **typed}, typed)

    @router.post("/profiles/{name}/hosts", response_class=HTMLResponse)
    def hosts(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        client_hosts: Annotated[str, Form(max_length=100_000)] = "",
    ) -> Response:
        typed = {"client_hosts": lines_of(client_hosts)}
        response = save(request, session, name, "hosts", lambda p: {**p, **typed}, typed)
        if response.status_code == 303:
            converted = notices({COLLECTION: [typed]})
            notes_for[session.token] = [p.message for p in converted]
        return response

    @router.post("/profiles/{name}/domains", response_class=HTMLResponse)
    def domains(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        sender_domains: Annotated[str, Form(max_length=100_000)] = "",
    ) -> Response:
        typed = {"sender_domains": lines_of(sender_domains)}
        return save(request, session, name, "domains", lambda p: {**p, **typed}, typed)

    @router.post("/profiles/{name}/relay", response_class=HTMLResponse)
    def relay(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        relay: Annotated[str, Form(max_length=50)] = "none",
    ) -> Response:
        typed = {"relay": relay}
        return save(request, session, name, "relay", lambda p: {**p, **typed}, typed)

    @router.post("/profiles/{name}/dmarc", response_class=HTMLResponse)
    def dmarc(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        dmarc_policy: Annotated[str, Form(max_length=20)] = "enforce",
    ) -> Response:
        typed = {"dmarc_policy": dmarc_policy}
        return save(request, session, name, "dmarc", lambda p: {**p, **typed}, typed)

    @router.post("/profiles/{name}/tls", response_class=HTMLResponse)
    def tls(  # noqa: PLR0913, PLR0917 - the form's fields
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        inbound_mandatory: Annotated[list[str] | None, Form()] = None,
        outbound_mandatory: Annotated[list[str] | None, Form()] = None,
        validate_certificate: Annotated[list[str] | None, Form()] = None,
        protocols_global: Annotated[list[str] | None, Form()] = None,
        protocols: Annotated[list[str] | None, Form()] = None,
        cipher_strength: Annotated[str, Form(max_length=20)] = "global",
        match: Annotated[str, Form(max_length=10_000)] = "",
    ) -> Response:
        typed = tls_settings(
            inbound_mandatory, outbound_mandatory, validate_certificate,
            protocols_global, protocols, cipher_strength, match,
        )  # fmt: skip
        return save(request, session, name, "tls", lambda p: {**p, **typed}, typed)

    # -- SMTP AUTH -------------------------------------------------------------------

    @router.post("/profiles/{name}/auth", response_class=HTMLResponse)
    def auth(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        enabled: Annotated[list[str] | None, Form()] = None,
    ) -> Response:
        on = ticked(enabled)

        def change_item(p: dict[str, Any]) -> dict[str, Any]:
            return {**p, "smtp_auth": {**p.get("smtp_auth", {}), "enabled": on}}

        return save(request, session, name, "auth", change_item)

    @router.post("/profiles/{name}/users", response_class=HTMLResponse)
    def add_user(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        username: Annotated[str, Form(max_length=255)] = "",
        password: Annotated[str, Form(max_length=1024)] = "",
    ) -> Response:
        user = username.strip()
        if not password:
            found = {"smtp_auth.credentials.password": ["enter the user's password"]}
            return page(request, session, name, 422, "users", found, new_user=user)
        try:
            token = encrypt(encryption_key(service.store, service.data_dir), password)
        except ConfigError as exc:  # no key on this node while the cluster has one
            found = {"": [str(p) for p in exc.problems]}
            return page(request, session, name, 422, "users", found, new_user=user)

        def change_item(p: dict[str, Any]) -> dict[str, Any]:
            auth = p.get("smtp_auth", {})
            credentials = auth.get("credentials", [])
            if any(c.get("username") == user for c in credentials):
                raise Conflict(f"user {user!r} exists already in this profile")
            added = [*credentials, {"username": user, "password": token}]
            return {**p, "smtp_auth": {**auth, "credentials": added}}

        what = f"profile {name}: add user {user}"
        return save(request, session, name, "users", change_item, what=what, new_user=user)

    @router.post("/profiles/{name}/users/remove", response_class=HTMLResponse)
    def remove_user(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        username: Annotated[str, Form(max_length=255)] = "",
    ) -> Response:
        def change_item(p: dict[str, Any]) -> dict[str, Any]:
            auth = p.get("smtp_auth", {})
            credentials = auth.get("credentials", [])
            if not any(c.get("username") == username for c in credentials):
                raise NotFound(f"no user {username!r} in this profile")
            kept = [c for c in credentials if c.get("username") != username]
            return {**p, "smtp_auth": {**auth, "credentials": kept}}

        return save(
            request, session, name, "users", change_item,
            what=f"profile {name}: remove user {username}",
        )  # fmt: skip

    @router.post("/profiles/{name}/send-credentials", response_class=HTMLResponse)
    async def credentials(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(change)],
        confirm: Annotated[str, Form(max_length=10)] = "",
    ) -> Response:
        if confirm != "yes":
            found = {"confirm": ["tick the box to confirm: the passwords go out in clear text"]}
            return page(request, session, name, 422, "auth", found)

        def send() -> dict[str, str]:
            config = parse_config(service.applied().document)
            queue = QueueStore(service.data_dir / "queue")
            try:
                return send_credentials(config, queue, name)
            finally:
                queue.close()

        try:
            result = await asyncio.to_thread(send)
        except (ConfigError, AdminError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else []
            message = "; ".join(str(p) for p in problems) or str(exc)
            found = {"": [f"the credentials were not sent: {message}"]}
            return page(request, session, name, 422, "auth", found)
        record(service.store, session.user.actor, "credentials.send", f"{name} → {result['to']}")
        notes_for[session.token] = [
            f"the credentials of {name} (as applied) are queued for {result['to']} "
            f"(queue id {result['queue_id']})"
        ]
        return RedirectResponse(f"/profiles/{quote(name)}#auth", status_code=303)

    # -- delete ------------------------------------------------------------------------

    @router.get("/profiles/{name}/delete", response_class=HTMLResponse)
    def confirm_delete(
        request: Request, name: str, session: Annotated[Session, Depends(see)]
    ) -> HTMLResponse:
        try:
            found = summary(edit.get_item(working(), COLLECTION, name))
        except NotFound as exc:
            return listing(request, session, 404, error=str(exc))
        return console.render(request, "profile_delete.html", session, profile=found)

    @router.post("/profiles/{name}/delete", response_class=HTMLResponse)
    def delete(
        request: Request, name: str, session: Annotated[Session, Depends(change)]
    ) -> Response:
        try:
            service.edit(
                lambda d: edit.delete_item(d, COLLECTION, name),
                session.user.actor,
                f"delete connection profile {name}",
            )
        except (ConfigError, AdminError) as exc:
            return listing(request, session, 422, error=f"not deleted: {exc}")
        notes_for[session.token] = [f"connection profile {name} deleted from the draft"]
        return RedirectResponse("/profiles", status_code=303)


def tls_settings(  # noqa: PLR0913, PLR0917 - the TLS form's fields
    inbound_mandatory: list[str] | None,
    outbound_mandatory: list[str] | None,
    validate_certificate: list[str] | None,
    protocols_global: list[str] | None,
    protocols: list[str] | None,
    cipher_strength: str,
    match: str,
) -> dict[str, Any]:
    """The TLS form as ``inbound_tls`` and ``outbound_tls`` settings (a profile's
    and the default profile's)."""
    chosen: str | list[str] = "global" if ticked(protocols_global) else list(protocols or [])
    outbound = {
        "mandatory": ticked(outbound_mandatory),
        "protocols": chosen,
        "cipher_strength": cipher_strength,
        "validate_certificate": ticked(validate_certificate),
        "match": lines_of(match),
    }
    return {"inbound_tls": {"mandatory": ticked(inbound_mandatory)}, "outbound_tls": outbound}


def ticked(values: list[str] | None) -> bool:
    """A checkbox sent with its hidden ``false`` companion: ticked if ``true`` came."""
    return values is not None and "true" in values
