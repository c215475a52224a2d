"""Structured logging set-up.

One event per state transition, keyed by the queue id when there is one.
Never a password, never a message body: callers pass facts, not payloads.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
current: dict[str, str] = {"level": "info", "format": "console"}  # for child processes


def log_options() -> list[str]:
    """Command-line options that give a child process this process's logging."""
    return ["--log-level", current["level"]] + (
        ["--log-json"] if current["format"] == "json" else []
    )


def configure(level: str = "info", *, json: bool = False) -> None:
    current.update(level=level, format="json" if json else "console")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
