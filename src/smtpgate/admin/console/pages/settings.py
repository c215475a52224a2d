"""Console page: every other shared section, each edited as YAML.

The sections with pages of their own (profiles, connectors, domains, TLS,
certificates) have forms; the rest (content security, outbound security,
POP3 connectors, limits, timeouts, queue, tracking, ...) are edited here as
the YAML an administrator would write in the file, one section at a time,
and checked by the same service as every other change: a problem is shown
under the section with its field path, in ``config check``'s words. So every
shared setting can be changed from the console. Node-local sections are not
offered (they live in each node's file).
"""

from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.config.document import LOCAL, Document
from smtpgate.config.load import yaml_problem
from smtpgate.errors import AdminError, ConfigError, NotFound

# Shared sections without a page of their own, with what each is for.
SECTIONS = {
    "spam": "Spam scanning (rspamd) and whether mail from inside is checked",
    "virus": "Virus scanning (clamd)",
    "sender_auth": "SPF, DKIM and DMARC verification; DKIM signing",
    "recipient_validation": "Recipient validation per hosted domain (list, callout, LDAP)",
    "quarantine": "How long held messages are kept",
    "outbound_security": "MTA-STS, DANE and TLS reports for direct delivery",
    "receive_connectors": "POP3(S) mailboxes fetched into the gateway",
    "queue": "Retries, delay warnings, connection cache, connector health, shaping",
    "limits": "Sizes, connections, AUTH throttling",
    "timeouts": "Per-phase time limits",
    "tracking": "How long message tracking records are kept",
    "spoof_detection": "Refuse hosted sender addresses from outside clients",
}
LOCAL_SECTIONS = {path for path in LOCAL if "." not in path}
MAX_YAML = 256 * 1024


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def text_of(document: Document, section: str) -> str:
        return str(yaml.safe_dump(document[section], sort_keys=False, allow_unicode=True))

    def show(
        request: Request,
        session: Session,
        status: int = 200,
        typed: dict[str, str] | None = None,
        found: dict[str, list[str]] | None = None,
    ) -> HTMLResponse:
        document = service.working()[0]
        sections = [
            {
                "name": name,
                "help": help_text,
                "text": (typed or {}).get(name, text_of(document, name)),
                "problems": (found or {}).get(name, []),
            }
            for name, help_text in SECTIONS.items()
            if name in document and name not in LOCAL_SECTIONS
        ]
        return console.render(request, "settings.html", session, status, sections=sections)

    @router.get("/settings", response_class=HTMLResponse)
    def settings(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return show(request, session)

    @router.post("/settings/{section}", response_class=HTMLResponse)
    def save(
        request: Request,
        section: str,
        session: Annotated[Session, Depends(change)],
        text: Annotated[str, Form(max_length=MAX_YAML)] = "",
    ) -> Response:
        if section not in SECTIONS:
            raise NotFound(f"no settings section {section!r} here")
        try:
            value: Any = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            return show(request, session, 422, {section: text}, {section: [yaml_problem(exc)]})

        def changed(document: Document) -> Document:
            return {**document, section: value}

        try:
            service.edit(changed, session.user.actor, f"{section} settings")
        except ConfigError as exc:
            found = [str(p) for p in exc.problems]
            return show(request, session, 422, {section: text}, {section: found})
        except AdminError as exc:
            return show(request, session, 409, {section: text}, {section: [str(exc)]})
        return RedirectResponse(f"/settings#{section}", status_code=303)
