"""Console page: the audit log.

The last entries of the store's audit log (who changed what, when: edits,
applies, queue actions, accounts), newest first, filtered by actor and
action (query parameters, so a filtered view is linkable).
"""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from smtpgate.admin.console.app import Console, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.operations import when

LIMIT = 200


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see = viewer(console)
    service = console.service

    @router.get("/audit", response_class=HTMLResponse)
    def audit(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        actor = request.query_params.get("actor", "").strip()[:200]
        action = request.query_params.get("action", "").strip()[:200]
        entries = service.store.audit_log(LIMIT)
        shown = [
            {"at": when(e.at), "actor": e.actor, "action": e.action, "detail": e.detail}
            for e in entries
            if actor.lower() in e.actor.lower() and action.lower() in e.action.lower()
        ]
        return console.render(
            request, "audit.html", session,
            entries=shown, total=len(entries), limit=LIMIT, actor=actor, action=action,
        )  # fmt: skip
