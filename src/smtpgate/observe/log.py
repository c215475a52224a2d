"""Structured logging set-up.

One event per state transition, keyed by the queue id when there is one.
Never a password, never a message body: callers pass facts, not payloads.

Where lines go (``logging.target``): stderr (the default), syslog (facility
mail, to ``logging.syslog_address``: a socket path or ``host:port`` over UDP)
or journald (through its syslog socket ``/dev/log``, which systemd-journald
listens on; no python-systemd dependency). The mail log's lines
(``observe.maillog``) are rendered as their documented text in plain mode.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
current: dict[str, str] = {"level": "info", "format": "console"}  # for child processes
JOURNAL_SOCKET = "/dev/log"
MAIL_EVENT = "mail"


def log_options() -> list[str]:
    """Command-line options that give a child process this process's logging."""
    return ["--log-level", current["level"]] + (
        ["--log-json"] if current["format"] == "json" else []
    )


class _SyslogFile:
    """A file-like target that sends each line to syslog (one datagram a line)."""

    def __init__(self, address: str) -> None:
        where: str | tuple[str, int] = address
        if not address.startswith("/"):
            host, _, port = address.rpartition(":")
            where = (host.strip("[]"), int(port))
        self.handler = logging.handlers.SysLogHandler(
            where, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        self.handler.ident = "smtpgate: "
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            if line:
                record = logging.LogRecord("smtpgate", logging.INFO, "", 0, line, None, None)
                self.handler.emit(record)
        return len(text)

    def flush(self) -> None:
        """Each line is sent as it completes."""


class _Output:
    """Where every logger writes; switched in place by :func:`set_target`, so
    loggers cached on first use follow the switch."""

    def __init__(self) -> None:
        self.dest: TextIO | _SyslogFile | None = None  # None: sys.stderr as it is now

    def write(self, text: str) -> int:
        return (self.dest or sys.stderr).write(text)

    def flush(self) -> None:
        (self.dest or sys.stderr).flush()


_output = _Output()


def configure(level: str = "info", *, json: bool = False) -> None:
    current.update(level=level, format="json" if json else "console")
    base: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )

    def render(logger: Any, name: str, event: Any) -> Any:
        if not json and event.get("event") == MAIL_EVENT and "line" in event:
            return f"{event['timestamp']} {event['line']}"  # the documented format
        return base(logger, name, event)

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_output),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def set_target(target: str, syslog_address: str = "") -> None:
    """Send the log to ``target`` (the ``logging`` settings): stderr, syslog or
    journald; level and format stay as configured."""
    if target == "syslog":
        _output.dest = _SyslogFile(syslog_address or JOURNAL_SOCKET)
    elif target == "journald":
        _output.dest = _SyslogFile(JOURNAL_SOCKET)
    else:
        _output.dest = None


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger


def mail_line(logger: structlog.typing.FilteringBoundLogger, line: str, event: object) -> None:
    """A mail log line: the text alone in plain mode, the text and the event's
    facts in JSON (``event: "mail"``, ``line``, ``kind``, ``queue_id``...)."""
    if current["format"] == "json":
        facts = {k: v for k, v in vars(event).items() if isinstance(v, str | int | float)}
        facts.pop("when", None)
        logger.info(MAIL_EVENT, line=line, kind=type(event).__name__, **facts)
    else:
        logger.info(MAIL_EVENT, line=line)
