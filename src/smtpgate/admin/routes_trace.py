"""Message tracking and health over HTTP.

``GET /api/v1/trace`` (a token, like every ``/api/`` route) reads this node's
``data_dir/tracking.db`` (``observe.tracking``). ``/healthz``, ``/readyz`` and
``/metrics`` sit outside ``/api/`` for load balancers and Prometheus:
``/healthz`` says this process answers; ``/readyz`` reflects the gateway
process through its heartbeat and probes the queue database
(``observe.health``); ``/metrics`` serves the exposition the gateway wrote
(``observe.metrics``), without a token to loopback clients or when
``admin.metrics_public`` is set, else only with a valid API token.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from smtpgate.admin.services import ConfigService
from smtpgate.observe import health, metrics, tracking

EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"


def _when(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        return tracking.parse_when(value)
    except ValueError:
        raise HTTPException(
            422, f"{name}: a time (ISO 8601, Unix seconds) or an age (2h)"
        ) from None


def trace_routes(router: APIRouter, service: ConfigService) -> None:
    data_dir = service.data_dir

    @router.get("/trace", tags=["tracking"])
    def trace(  # noqa: PLR0913, PLR0917 - one query parameter per criterion
        queue_id: str | None = None,
        message_id: str | None = None,
        sender: str | None = None,
        recipient: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: Annotated[int, Query(ge=1, le=tracking.MAX_RESULTS)] = 100,
    ) -> list[dict[str, Any]]:
        """What happened to the matching messages, newest first (refusals included)."""
        query = tracking.Query(
            queue_id, message_id, sender, recipient,
            _when(since, "since"), _when(until, "until"), limit,
        )  # fmt: skip
        return tracking.search(data_dir, query)


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def health_routes(
    app: FastAPI, service: ConfigService, token_name: Callable[[str], str | None]
) -> None:
    data_dir = service.data_dir

    @app.get("/healthz", tags=["health"], include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], include_in_schema=False)
    def readyz() -> JSONResponse:
        ready, checks = health.readiness(data_dir)
        try:
            service.store.applied_number()
        except Exception as exc:  # the API's own way to the store
            checks["store"] = f"unreachable: {type(exc).__name__}"
            ready = False
        return JSONResponse({"ready": ready, "checks": checks}, 200 if ready else 503)

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    def metrics_page(request: Request) -> Response:
        found = health.read_health(data_dir) or {}
        if not (_loopback(request) or found.get("metrics_public")):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token_name(token.strip()) is None:
                return JSONResponse(
                    {"detail": "metrics need an API token from here", "problems": []},
                    401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        text = metrics.read_exposition(data_dir)
        if text is None:
            return Response("# the gateway has written no metrics yet\n", 503)
        return Response(text, media_type=EXPOSITION)
