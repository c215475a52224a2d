"""Console page: the default profile, what a client that matches no connection
profile gets (its relay mode and TLS), with the same relay and TLS forms as a
profile's page (``profile_policy.html``)."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.pages.profiles import (
    CIPHER_STRENGTHS,
    errors_under,
    relay_modes,
    tls_settings,
)
from smtpgate.admin.console.sessions import Session
from smtpgate.config.document import Document
from smtpgate.config.schema import TLS_ORDER
from smtpgate.errors import ConfigError

SECTION = "default_profile"
PATH = "/default-profile"


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def page(  # noqa: PLR0913, PLR0917 - a page with one form's state
        request: Request,
        session: Session,
        status: int = 200,
        form: str = "",
        found: dict[str, list[str]] | None = None,
        shown: dict[str, Any] | None = None,
    ) -> HTMLResponse:
        document = service.working()[0]
        profile = {**document[SECTION], **(shown or {}), "name": "default"}
        check_outbound = bool(document.get("spam", {}).get("check_outbound", False))
        return console.render(
            request, "default_profile.html", session, status,
            profile=profile, base=PATH, form=form, found=found or {},
            modes=relay_modes(check_outbound), check_outbound=check_outbound,
            ciphers=CIPHER_STRENGTHS, versions=TLS_ORDER, admin=session.user.may_change,
        )  # fmt: skip

    def save(request: Request, session: Session, form: str, typed: dict[str, Any]) -> Response:
        def changed(document: Document) -> Document:
            return {**document, SECTION: {**document[SECTION], **typed}}

        try:
            service.edit(changed, session.user.actor, f"default profile ({form})")
        except ConfigError as exc:
            return page(request, session, 422, form, errors_under(exc.problems, SECTION), typed)
        return RedirectResponse(f"{PATH}#{form}", status_code=303)

    @router.get(PATH, response_class=HTMLResponse)
    def show(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return page(request, session)

    @router.post(PATH + "/relay", response_class=HTMLResponse)
    def relay(
        request: Request,
        session: Annotated[Session, Depends(change)],
        relay: Annotated[str, Form(max_length=50)] = "none",
    ) -> Response:
        return save(request, session, "relay", {"relay": relay})

    @router.post(PATH + "/dmarc", response_class=HTMLResponse)
    def dmarc(
        request: Request,
        session: Annotated[Session, Depends(change)],
        dmarc_policy: Annotated[str, Form(max_length=20)] = "enforce",
    ) -> Response:
        return save(request, session, "dmarc", {"dmarc_policy": dmarc_policy})

    @router.post(PATH + "/tls", response_class=HTMLResponse)
    def tls(  # noqa: PLR0913, PLR0917 - the form's fields
        request: Request,
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
        return save(request, session, "tls", typed)
