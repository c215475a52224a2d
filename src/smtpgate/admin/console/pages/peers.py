"""Console page: peers.

Every node that reported to the store (``nodes.cluster``, as ``smtpgate
cluster status`` and ``GET /cluster``): up, stale or down, the revision it
runs and how far behind the applied one, its last error, queue, roles and
version. An administrator may forget a node that is stale or down (one that
left for good), audited as the API's ``DELETE /cluster/{node}``.
"""

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin import nodes
from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.services import record
from smtpgate.errors import AdminError, NotFound


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def page(
        request: Request, session: Session, status: int = 200, error: str = ""
    ) -> HTMLResponse:
        cluster = nodes.cluster(service.store, console.clock())
        return console.render(
            request, "peers.html", session, status,
            cluster=cluster, error=error, flash=request.query_params.get("done", "")[:200],
        )  # fmt: skip

    @router.get("/peers", response_class=HTMLResponse)
    def peers(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return page(request, session)

    @router.post("/peers/{node}/forget", response_class=HTMLResponse)
    def forget(
        request: Request, node: str, session: Annotated[Session, Depends(change)]
    ) -> Response:
        try:
            nodes.forget(service.store, node, console.clock())
        except NotFound as exc:
            return page(request, session, 404, str(exc))
        except AdminError as exc:  # still up: it would only report again
            return page(request, session, 409, str(exc))
        record(service.store, session.user.actor, "cluster forget", node)
        return RedirectResponse("/peers?done=" + quote(f"node {node} forgotten"), status_code=303)
