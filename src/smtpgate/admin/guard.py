"""The API's door: no token, no work; no request bigger than it needs to be.

A pure ASGI middleware in front of every route, the API's documentation
(``/openapi.json``, ``/docs``, ``/redoc``) included: the specification lists
every operation and the whole configuration schema, which is nobody's
business without a token. It answers 401
before the request body is read (so an anonymous client cannot make the
gateway buffer anything) and 413 for a body over the limit, whether the
client declared its length or streams it in chunks. Tokens live in the
configuration store: while it is unreachable, every request gets 503 saying so
(a token cannot be checked, so none is trusted).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 4 * 1024 * 1024  # a whole configuration is a few kilobytes


# What needs a token: the API and its documentation. Everything else is the
# console, whose pages need a session (``smtpgate.admin.console``).
TOKEN_PATHS = ("/api/", "/docs", "/redoc", "/openapi.json")


def guarded(path: str) -> bool:
    return path == "/api" or path.startswith(TOKEN_PATHS)


class StoreUnreachable(Exception):  # noqa: N818 - says what happened, as the reply does
    """The configuration store did not answer; the message says why."""


def bearer_token(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class Guard:
    """401 without a valid token, 413 above ``limit`` octets of body. ``token_name``
    gives a token's name (None when unknown); routes find the caller as
    ``request.state.actor``."""

    def __init__(
        self, app: ASGIApp, token_name: Callable[[str], str | None], limit: int = MAX_BODY
    ) -> None:
        self.app = app
        self.token_name = token_name
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not guarded(scope.get("path", "")):  # the console checks its own sessions
            await self.app(scope, self._counting(receive), send)
            return
        try:
            name = self.token_name(bearer_token(scope))
        except StoreUnreachable as exc:
            down = JSONResponse({"detail": str(exc), "problems": []}, 503)
            await down(scope, receive, send)
            return
        if name is None:
            response = JSONResponse(
                {
                    "detail": "a valid API token is needed (Authorization: Bearer ...)",
                    "problems": [],
                },
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.limit:
            too_big = JSONResponse({"detail": self._too_big(), "problems": []}, 413)
            await too_big(scope, receive, send)
            return
        scope.setdefault("state", {})["actor"] = f"token:{name}"
        await self.app(scope, self._counting(receive), send)

    def _too_big(self) -> str:
        return f"the request body is larger than {self.limit} octets"

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, self._too_big())
            return message

        return counted
