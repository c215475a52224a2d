"""Console page: the configuration history.

Every applied revision (number, when, by whom, the comment) with what it
changed against the one before, as ``config diff`` words it, and *Roll back
to this revision*: ``service.rollback`` stages that revision as the draft
(it is applied like any other change, from the *Changes Made* panel).
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.operations import when
from smtpgate.admin.services import ConfigService
from smtpgate.config.document import diff
from smtpgate.errors import AdminError, Conflict, NotFound

SHOWN = 50  # revisions with their diffs on the page


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def page(request: Request, session: Session, status: int = 200, **extra: Any) -> HTMLResponse:
        revisions = _revisions(service)
        return console.render(
            request, "history.html", session, status,
            revisions=revisions[:SHOWN], more=max(len(revisions) - SHOWN, 0),
            applied=service.store.applied_number(), has_draft=service.store.draft() is not None,
            **extra,
        )  # fmt: skip

    @router.get("/history", response_class=HTMLResponse)
    def history(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return page(request, session)

    @router.post("/history/{number}/rollback", response_class=HTMLResponse)
    def rollback(
        request: Request,
        number: int,
        session: Annotated[Session, Depends(change)],
        replace_draft: Annotated[bool, Form()] = False,
    ) -> Response:
        try:
            service.rollback(number, session.user.actor, force=replace_draft)
        except NotFound as exc:
            return page(request, session, 404, error=str(exc))
        except Conflict as exc:
            return page(request, session, 409, error=str(exc), conflict=number)
        except AdminError as exc:
            return page(request, session, 422, error=str(exc))
        return RedirectResponse("/changes", status_code=303)


def _revisions(service: ConfigService) -> list[dict[str, Any]]:
    """Each revision, newest first, with its changes against the one before."""
    found = []
    history = service.history()
    for index, revision in enumerate(history):
        entry: dict[str, Any] = {
            "number": revision.number,
            "at": when(revision.applied_at),
            "by": revision.applied_by,
            "comment": revision.comment,
            "changes": [],
            "first": False,
        }
        if index < SHOWN:
            older = history[index + 1] if index + 1 < len(history) else None
            if older is None:
                entry["first"] = True
            else:
                before = service.whole(older.document)
                after = service.whole(revision.document)
                entry["changes"] = [c.text() for c in diff(before, after)]
        found.append(entry)
    return found
