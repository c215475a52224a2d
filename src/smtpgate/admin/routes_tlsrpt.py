"""TLS reports (RFC 8460) over HTTP: ``POST /api/v1/tlsrpt/send`` sends a day's
aggregate reports of this node (``admin/tlsreports.py``); ``POST
/api/v1/tlsrpt/summary`` reads a TLS report received by a hosted domain (the
request body: JSON, gzip'ed JSON or the whole message, at most 16 MiB) and
answers the parsed report with its readable summary."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from smtpgate.admin.http import Actor
from smtpgate.admin.services import ConfigService, record
from smtpgate.admin.tlsreports import send_day, summary
from smtpgate.config.load import parse_config

MAX_BODY = 16 * 1024 * 1024
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def tlsrpt_routes(router: APIRouter, service: ConfigService) -> None:
    @router.post("/tlsrpt/send", tags=["operations"])
    async def send(day: str, who: Actor) -> dict[str, Any]:
        if not DAY.match(day):
            raise HTTPException(422, "day: YYYY-MM-DD")
        done = await send_day(parse_config(service.applied().document), day)
        record(service.store, who, "tlsrpt.send", day)
        return {"day": day, "sent": done}

    @router.post("/tlsrpt/summary", tags=["operations"])
    async def read(request: Request) -> dict[str, Any]:
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise HTTPException(413, "a TLS report is at most 16 MiB")
        try:
            return summary(data)
        except ValueError as exc:
            raise HTTPException(422, f"not a TLS report: {exc}") from None
