"""The console's page modules; each has ``routes(router, console)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import APIRouter

    from smtpgate.admin.console.app import Console

Register = Callable[["APIRouter", "Console"], None]

ALL: list[Register] = []
