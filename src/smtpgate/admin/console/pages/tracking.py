"""Console page: message tracking.

What ``smtpgate trace`` and ``GET /api/v1/trace`` find (queue id,
Message-ID, sender, recipient, time window), read from this node's
``data_dir/tracking.db``: one block per message with its status and every
event (accepted, refused, each attempt with the remote reply and TLS, the
report sent). Read-only, for any console user.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from smtpgate.admin.console.app import Console, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.observe import tracking

FILTERS = ("queue_id", "message_id", "sender", "recipient", "since", "until")
LIMIT = 100


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see = viewer(console)
    data_dir = console.service.data_dir

    @router.get("/tracking", response_class=HTMLResponse)
    def listing(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        filters = {key: request.query_params.get(key, "").strip()[:512] for key in FILTERS}
        errors: dict[str, list[str]] = {}
        times: dict[str, float | None] = {}
        for name in ("since", "until"):
            times[name] = None
            if filters[name]:
                try:
                    times[name] = tracking.parse_when(filters[name])
                except ValueError:
                    errors[name] = ["A time (2026-11-29T16:00:00Z) or an age (30m, 2h, 1d)."]
        records: list[dict[str, Any]] = []
        searched = any(filters.values())
        if searched and not errors:
            query = tracking.Query(
                filters["queue_id"] or None, filters["message_id"] or None,
                filters["sender"] or None, filters["recipient"] or None,
                times["since"], times["until"], LIMIT,
            )  # fmt: skip
            records = [_shown(r) for r in tracking.search(data_dir, query)]
        return console.render(
            request, "tracking.html", session, 422 if errors else 200,
            filters=filters, errors=errors, records=records, searched=searched, limit=LIMIT,
        )  # fmt: skip


def _shown(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "queue_id": record["queue_id"],
        "status": record["status"],
        "first": tracking.time_text(record["first"]),
        "events": [
            {"at": tracking.time_text(e["at"]), "kind": e["kind"], "text": tracking.event_text(e)}
            for e in record["events"]
        ],
    }
