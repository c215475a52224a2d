"""Console page: listeners, read only.

Listeners are node-local: each node binds the addresses its own configuration
file names, and a change takes effect when that node restarts
(``docs/cluster.md``). The page shows this node's.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from smtpgate.admin.console.app import Console, viewer
from smtpgate.admin.console.sessions import Session


def identity(value: Any) -> str:
    """A listener's ``client_identity`` in words."""
    if isinstance(value, dict):
        if "require_certificate" in value:
            return f"certificate {value['require_certificate']}"
        if "require_spki_pin" in value:
            return f"public key pin {value['require_spki_pin']}"
    return str(value)


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see = viewer(console)

    @router.get("/listeners", response_class=HTMLResponse)
    def listeners(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        document = console.service.working()[0]
        rows = [
            {**item, "identity": identity(item.get("client_identity", "any"))}
            for item in document.get("listeners", [])
        ]
        return console.render(
            request, "listeners.html", session, listeners=rows, node=console.service.node
        )
