"""Console page: hosted domains (list, add, remove).

The same change as the API's ``/config/draft/hosted_domains``: the domain goes
to the draft, and the schema's check normalises it (lower case, A-labels) or
says why it is not a domain name, under the field.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.config.document import Document
from smtpgate.config.schema import normalise_domain
from smtpgate.errors import AdminError, ConfigError, Conflict, NotFound


def normal(domain: str) -> str:
    """``domain`` in the schema's normal form, or lower-cased when it has none
    (the check then says why)."""
    try:
        return normalise_domain(domain)
    except ValueError:
        return domain.strip().lower()


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def show(request: Request, session: Session, status: int = 200, **extra: Any) -> HTMLResponse:
        domains = service.working()[0].get("hosted_domains", [])
        context: dict[str, Any] = {"domains": domains, "found": {}, "typed": ""} | extra
        return console.render(request, "domains.html", session, status, **context)

    @router.get("/domains", response_class=HTMLResponse)
    def domains(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return show(request, session)

    @router.post("/domains", response_class=HTMLResponse)
    def add(
        request: Request,
        session: Annotated[Session, Depends(change)],
        domain: Annotated[str, Form(max_length=300)] = "",
    ) -> Response:
        typed = domain.strip()

        def change_document(document: Document) -> Document:
            if normal(typed) in document["hosted_domains"]:
                raise Conflict(f"{typed} is a hosted domain already")
            return {**document, "hosted_domains": [*document["hosted_domains"], typed]}

        try:
            service.edit(change_document, session.user.actor, f"add hosted domain {typed}")
        except ConfigError as exc:
            messages = [
                p.message if p.path.startswith("hosted_domains") else str(p) for p in exc.problems
            ]
            found = {"domain": messages if typed else ["enter a domain name"]}
            return show(request, session, 422, found=found, typed=typed)
        except Conflict as exc:
            return show(request, session, 409, found={"domain": [str(exc)]}, typed=typed)
        return RedirectResponse("/domains", status_code=303)

    @router.post("/domains/remove", response_class=HTMLResponse)
    def remove(
        request: Request,
        session: Annotated[Session, Depends(change)],
        domain: Annotated[str, Form(max_length=300)] = "",
    ) -> Response:
        def change_document(document: Document) -> Document:
            if domain not in document["hosted_domains"]:
                raise NotFound(f"{domain} is not a hosted domain")
            kept = [d for d in document["hosted_domains"] if d != domain]
            return {**document, "hosted_domains": kept}

        try:
            service.edit(change_document, session.user.actor, f"remove hosted domain {domain}")
        except (ConfigError, AdminError) as exc:
            return show(request, session, 409, error=f"{domain} was not removed: {exc}")
        return RedirectResponse("/domains", status_code=303)
