"""What every part of the REST API shares: the request-body base, the error
body, and the caller's identity (``token:<name>`` for the audit log)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from smtpgate.errors import FieldProblem


class StrictBody(BaseModel):
    """Request bodies are strict: ``0`` is not ``false`` and ``"1"`` is not 1."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Value(StrictBody):
    value: str = Field(min_length=1, max_length=1000)


class Flag(StrictBody):
    value: bool


class Problem(BaseModel):
    path: str
    message: str


class ErrorBody(BaseModel):
    """Every error reply: a sentence, and the fields at fault when there are any."""

    detail: str
    problems: list[Problem] = Field(default_factory=list)


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the request cannot be done as asked"},
    401: {"model": ErrorBody, "description": "no valid API token"},
    404: {"model": ErrorBody, "description": "no such object, revision or message"},
    409: {"model": ErrorBody, "description": "conflicts with the store's state (draft)"},
    413: {"model": ErrorBody, "description": "the request body is too large"},
    422: {"model": ErrorBody, "description": "invalid request or resulting configuration"},
}


def problems(found: list[FieldProblem]) -> list[dict[str, str]]:
    return [{"path": p.path, "message": p.message} for p in found]


# Declares the scheme in the OpenAPI spec; the token is checked by ``guard.Guard``
# before any route runs.
bearer = HTTPBearer(auto_error=False)


def require_actor(request: Request) -> str:
    """The audit log's name for the caller, as the guard found it: ``token:<name>``."""
    actor: str = request.state.actor
    return actor


Actor = Annotated[str, Depends(require_actor)]
