"""Console page: policy explain.

A GET form (so a result is linkable) with the facts of an SMTP session: the
client's IP address and confirmed host names, HELO, sender, recipients, TLS,
the authenticated user, the listener and the verified client certificate.
The answer is what ``POST /policy/explain`` and ``smtpgate policy explain``
give: ``explain_policy`` on the applied configuration, replaying the server's
own steps. The gateway's DNS is asked for the client's forward-confirmed names
only when the form says so, as the API's ``lookup``.
"""

import ipaddress
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from starlette.datastructures import QueryParams

from smtpgate.admin.console.app import Console, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.operations import explain_policy
from smtpgate.config.load import parse_config
from smtpgate.dns import DnsResolver, confirmed_names
from smtpgate.errors import AdminError, ConfigError
from smtpgate.policy.explain import Facts, UnknownListenerError

# The API's limits (routes_ops.ExplainRequest).
MAX_NAMES, MAX_RECIPIENTS, MAX_TEXT = 20, 100, 512


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see = viewer(console)
    service = console.service

    @router.get("/explain", response_class=HTMLResponse)
    async def explain(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        form = _form(request.query_params)
        errors: dict[str, list[str]] = {}
        result: dict[str, Any] | None = None
        text, error = "", ""
        try:
            config = parse_config(service.applied().document)
        except (AdminError, ConfigError) as exc:
            config, error = None, f"no applied configuration to explain: {exc}"
        listeners = [listener.name for listener in config.listeners] if config else []
        if config is not None and form["asked"]:
            errors = _check(form)
            if not errors:
                try:
                    result, text = await _explain(config, form)
                except UnknownListenerError as exc:
                    errors["listener"] = [str(exc)]
        return console.render(
            request, "explain.html", session, 422 if errors else 200,
            form=form, errors=errors, result=result, explanation_text=text, error=error,
            listeners=["", *listeners],
        )  # fmt: skip


async def _explain(config: Any, form: dict[str, Any]) -> tuple[dict[str, Any], str]:
    names = list(form["confirmed_names"])
    if form["lookup"]:  # the gateway's DNS, as a session would see it
        names += await confirmed_names(DnsResolver(config.gateway.dns), form["client_ip"])
    facts = Facts(
        client_ip=str(ipaddress.ip_address(form["client_ip"])),
        confirmed_names=names,
        helo=form["helo"] or None,
        sender=form["sender"] if form["sender_given"] else None,
        recipients=form["recipients"],
        tls=form["tls"],
        auth_user=form["auth_user"] or None,
        client_certificate=form["client_certificate"] or None,
        listener=form["listener"] or None,
    )
    explanation = explain_policy(config, facts)
    return explanation.as_dict(), explanation.as_text()


def _form(query: QueryParams) -> dict[str, Any]:
    def text(name: str) -> str:
        return query.get(name, "").strip()[:MAX_TEXT]

    def checked(name: str) -> bool:
        values = query.getlist(name)
        return bool(values) and values[-1] == "true"

    return {
        "asked": "client_ip" in query,
        "client_ip": text("client_ip"),
        "confirmed_names": _lines(query.get("confirmed_names", "")),
        "helo": text("helo"),
        "sender": text("sender"),
        "sender_given": bool(text("sender")) or checked("null_sender"),
        "null_sender": checked("null_sender"),
        "recipients": _lines(query.get("recipients", "")),
        "tls": checked("tls"),
        "auth_user": text("auth_user"),
        "listener": text("listener"),
        "client_certificate": text("client_certificate"),
        "lookup": checked("lookup"),
    }


def _lines(text: str) -> list[str]:
    parts = text[: 100 * MAX_TEXT].replace(",", "\n").splitlines()
    return [part.strip()[:MAX_TEXT] for part in parts if part.strip()]


def _check(form: dict[str, Any]) -> dict[str, list[str]]:
    """The problems the API's request model would report, next to their fields."""
    errors: dict[str, list[str]] = {}
    if not form["client_ip"]:
        errors["client_ip"] = ["the client's IP address is required"]
    else:
        try:
            ipaddress.ip_address(form["client_ip"])
        except ValueError as exc:
            errors["client_ip"] = [str(exc)]
    if len(form["confirmed_names"]) > MAX_NAMES:
        errors["confirmed_names"] = [f"at most {MAX_NAMES} host names"]
    if len(form["recipients"]) > MAX_RECIPIENTS:
        errors["recipients"] = [f"at most {MAX_RECIPIENTS} recipients"]
    return errors
