"""Console page: the quarantine.

The messages held by a scanner's verdict on this node (oldest first), one
page per message (envelope, each scanner's verdict, the header section) and
the actions release (into the queue, delivered as if clean) and delete, by
the same functions as the API and ``smtpgate quarantine``, audited alike.
"""

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.services import record
from smtpgate.content import quarantine as q
from smtpgate.errors import NotFound

ACTIONS = ("release", "delete")


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def store() -> q.QuarantineStore:
        return q.QuarantineStore(q.quarantine_dir(service.data_dir))

    @router.get("/quarantine", response_class=HTMLResponse)
    def listing(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        entries = [q.entry_dict(held) for held in store().entries()]
        return console.render(
            request, "quarantine.html", session,
            entries=entries, flash=request.query_params.get("done", "")[:200],
        )  # fmt: skip

    @router.get("/quarantine/{message_id}", response_class=HTMLResponse)
    def show(
        request: Request, message_id: str, session: Annotated[Session, Depends(see)]
    ) -> HTMLResponse:
        try:
            entry = q.show_dict(store(), message_id)
        except NotFound as exc:
            return console.render(request, "quarantine.html", session, 404, error=str(exc))
        return console.render(request, "quarantine.html", session, entry=entry, actions=ACTIONS)

    @router.post("/quarantine/{message_id}/{action}", response_class=HTMLResponse)
    def act(
        request: Request,
        message_id: str,
        action: str,
        session: Annotated[Session, Depends(change)],
    ) -> Response:
        if action not in ACTIONS:
            return console.render(
                request, "quarantine.html", session, 404,
                error=f"no quarantine action {action!r}",
            )  # fmt: skip
        try:
            if action == "release":
                q.release(service.data_dir, message_id)
            else:
                q.delete(service.data_dir, message_id)
        except NotFound as exc:
            return console.render(request, "quarantine.html", session, 404, error=str(exc))
        record(service.store, session.user.actor, f"quarantine.{action}", message_id)
        done = f"message {message_id} {action}d"
        return RedirectResponse("/quarantine?done=" + quote(done), status_code=303)
