"""The console's page modules; each registers its routes with ``routes(router, console)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from smtpgate.admin.console.pages import (
    audit,
    certificates,
    connectors,
    default_profile,
    domains,
    explain,
    history,
    listeners,
    peers,
    profiles,
    quarantine,
    queue,
    settings,
    tls,
    tracking,
)

if TYPE_CHECKING:
    from fastapi import APIRouter

    from smtpgate.admin.console.app import Console

Register = Callable[["APIRouter", "Console"], None]

ALL: list[Register] = [
    profiles.routes,
    default_profile.routes,
    connectors.routes,
    domains.routes,
    listeners.routes,
    tls.routes,
    settings.routes,
    certificates.routes,
    queue.routes,
    quarantine.routes,
    tracking.routes,
    explain.routes,
    peers.routes,
    history.routes,
    audit.routes,
]
