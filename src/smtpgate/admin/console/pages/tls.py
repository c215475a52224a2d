"""Console page: tls (to be built)."""

from fastapi import APIRouter

from smtpgate.admin.console.app import Console


def routes(router: APIRouter, console: Console) -> None:
    """Register this page's routes."""
