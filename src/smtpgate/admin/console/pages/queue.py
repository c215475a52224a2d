"""Console page: the queue.

A filtered list (state, sender, recipient, domain, older than: what
``smtpgate queue list`` and ``GET /queue`` take), one page per message
(envelope, recipients with their state, attempts and last reply, a summary
of the headers) and the actions retry, hold, release, bounce and delete, by
the same ``queue_act`` as the API and the CLI, audited as the API audits them.
"""

import email.policy
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from smtpgate.admin.console.app import Console, changer, problems_by_field, viewer
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.operations import message_dict, queue_act, queue_list, queue_show
from smtpgate.admin.services import record
from smtpgate.errors import AdminError, ConfigError, NotFound
from smtpgate.queue.store import QueueStore

STATES = ["", "queued", "deferred", "held", "bounce"]
FILTERS = ("state", "sender", "recipient", "domain", "older_than")
ACTIONS = ("retry", "hold", "release", "bounce", "delete")
SUMMARY_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To")
HEADER_BYTES = 64 * 1024  # enough for any sane header block


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def open_queue() -> QueueStore:
        return QueueStore(service.data_dir / "queue")

    @router.get("/queue", response_class=HTMLResponse)
    def listing(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        filters = {key: request.query_params.get(key, "").strip()[:512] for key in FILTERS}
        errors: dict[str, list[str]] = {}
        messages: list[dict[str, Any]] = []
        store = open_queue()
        try:
            messages = queue_list(store, {k: v or None for k, v in filters.items()})
            counts = store.counts()
        except ConfigError as exc:
            errors = problems_by_field(exc)
            counts = store.counts()
        finally:
            store.close()
        return console.render(
            request, "queue.html", session, 422 if errors else 200,
            filters=filters, errors=errors, messages=messages, counts=counts,
            states=STATES, flash=request.query_params.get("done", "")[:200],
        )  # fmt: skip

    @router.get("/queue/{message_id}", response_class=HTMLResponse)
    def show(
        request: Request, message_id: str, session: Annotated[Session, Depends(see)]
    ) -> HTMLResponse:
        store = open_queue()
        try:
            message = queue_show(store, message_id)
            headers = _headers(store.body(message_id))
        except NotFound as exc:
            return console.render(request, "message.html", session, 404, error=str(exc))
        finally:
            store.close()
        return console.render(
            request, "message.html", session,
            message=message_dict(message), meta=_meta(message.meta), headers=headers,
            actions=ACTIONS, flash=request.query_params.get("done", "")[:200],
        )  # fmt: skip

    @router.post("/queue/retry-all")
    def retry_all(session: Annotated[Session, Depends(change)]) -> Response:
        store = open_queue()
        try:
            result = queue_act(store, "retry", None)
        finally:
            store.close()
        record(service.store, session.user.actor, "queue.retry", "all")
        done = f"{result['recipients']} recipient(s) due now"
        return RedirectResponse("/queue?done=" + quote(done), status_code=303)

    @router.post("/queue/{message_id}/{action}", response_class=HTMLResponse)
    def act(
        request: Request,
        message_id: str,
        action: str,
        session: Annotated[Session, Depends(change)],
    ) -> Response:
        if action not in ACTIONS:
            return console.render(
                request, "message.html", session, 404, error=f"no queue action {action!r}"
            )
        store = open_queue()
        try:
            result = queue_act(store, action, message_id)
        except (NotFound, AdminError) as exc:
            return console.render(request, "message.html", session, 404, error=str(exc))
        finally:
            store.close()
        record(service.store, session.user.actor, f"queue.{action}", message_id)
        if action == "delete":
            done = f"message {message_id} deleted"
            return RedirectResponse("/queue?done=" + quote(done), status_code=303)
        done = f"{action}: {result['recipients']} recipient(s) now {result['state']}"
        return RedirectResponse(
            f"/queue/{quote(message_id, safe='')}?done=" + quote(done), status_code=303
        )


def _meta(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """The envelope facts the gateway recorded at reception, for people."""
    labels = {
        "client_ip": "Client",
        "helo": "HELO",
        "profile": "Connection profile",
        "tls": "TLS",
        "auth_user": "Authenticated as",
        "spam_check": "Spam check",
    }
    return [
        (label, str(meta[key])) for key, label in labels.items() if meta.get(key) not in (None, "")
    ]


def _headers(body: bytes | Path | None) -> list[tuple[str, str]]:
    """The summary headers of the message (its body is never shown)."""
    if body is None:
        return []
    try:
        if isinstance(body, Path):
            with body.open("rb") as file:
                head = file.read(HEADER_BYTES)
        else:
            head = body[:HEADER_BYTES]
    except OSError:
        return []
    end = head.find(b"\r\n\r\n")
    head = head[: end + 2] if end >= 0 else head
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    found = []
    for name in SUMMARY_HEADERS:
        for value in parsed.get_all(name) or []:
            try:
                text = str(value)
            except Exception:  # a header the parser cannot decode: show it raw
                text = repr(value)
            found.append((name, text[:500]))
    return found
