"""The exception tree of smtpgate.

    SmtpgateError
    ├── ConfigError            a configuration document is invalid (carries field paths)
    ├── AdminError             an administrative request cannot be done as asked
    │   ├── NotFound           ... because the thing it names does not exist
    │   └── Conflict           ... because of the store's state (a draft exists, changed)
    ├── ProtocolUsageError     our own code drove the sans-IO core wrongly (a bug)
    ├── DeliveryError          a downstream hop could not take a message
    └── QueueError             the queue's storage failed: nothing was made durable

Protocol violations by *peers* are never exceptions: the core answers them
with a reply. Exceptions are for our own mistakes and for failures that the
caller must decide about.
"""

from __future__ import annotations

from dataclasses import dataclass


class SmtpgateError(Exception):
    """Base of every error smtpgate raises on purpose."""


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One problem in a configuration document, located by its field path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(SmtpgateError):
    """A configuration document is invalid; ``problems`` names every field."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class AdminError(SmtpgateError):
    """An administrative request cannot be done as asked; the message says why."""


class NotFound(AdminError):  # noqa: N818 - named for the HTTP status it becomes
    """The request names a revision, object or message that does not exist."""


class Conflict(AdminError):  # noqa: N818 - named for the HTTP status it becomes
    """The store's state forbids the request (a draft would be replaced, the
    draft changed since it was read, there is nothing to apply)."""


class ProtocolUsageError(SmtpgateError):
    """The application drove the protocol core out of order (a bug in smtpgate)."""


class DeliveryError(SmtpgateError):
    """A downstream hop refused or failed; ``permanent`` says whether to retry."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        self.permanent = permanent
        super().__init__(message)


class QueueError(SmtpgateError):
    """The queue database failed (locked, full, closed, corrupt); the message says
    what SQLite said. A write that raises this did not happen."""
