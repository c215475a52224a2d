"""Console page: the shared ``tls`` settings (opportunistic STARTTLS, protocol
versions, cipher strength, extra trusted CAs), replaced whole in the draft as
the API's ``PUT /config/draft/tls`` does."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.pages.profiles import errors_under, lines_of, ticked
from smtpgate.admin.console.sessions import Session
from smtpgate.config.schema import TLS_ORDER
from smtpgate.errors import AdminError, ConfigError

CIPHER_STRENGTHS = ("high", "medium", "any")


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def show(
        request: Request,
        session: Session,
        status: int = 200,
        shown: dict[str, Any] | None = None,
        found: dict[str, list[str]] | None = None,
    ) -> HTMLResponse:
        settings = {**service.working()[0]["tls"], **(shown or {})}
        return console.render(
            request, "tls.html", session, status,
            tls=settings, found=found or {}, versions=TLS_ORDER, ciphers=CIPHER_STRENGTHS,
        )  # fmt: skip

    @router.get("/tls", response_class=HTMLResponse)
    def tls(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return show(request, session)

    @router.post("/tls", response_class=HTMLResponse)
    def save(  # noqa: PLR0913, PLR0917 - the form's fields
        request: Request,
        session: Annotated[Session, Depends(change)],
        opportunistic: Annotated[list[str] | None, Form()] = None,
        protocols: Annotated[list[str] | None, Form()] = None,
        cipher_strength: Annotated[str, Form(max_length=20)] = "high",
        ca_files: Annotated[str, Form(max_length=100_000)] = "",
    ) -> Response:
        body = {
            "opportunistic": ticked(opportunistic),
            "protocols": list(protocols or []),
            "cipher_strength": cipher_strength,
            "ca_files": lines_of(ca_files),
        }
        try:
            service.edit(lambda d: {**d, "tls": body}, session.user.actor, "tls settings")
        except ConfigError as exc:
            return show(request, session, 422, body, errors_under(exc.problems, "tls"))
        except AdminError as exc:
            return show(request, session, 409, body, {"": [str(exc)]})
        return RedirectResponse("/tls", status_code=303)
