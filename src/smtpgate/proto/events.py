"""Events the server core produces from the client's bytes.

Events are frozen dataclasses named as nouns. Command events wait for the
application's reply (``ServerConnection.reply``) before the core moves on;
``MessageData`` carries body bytes and needs none; ``MessageRejected`` has
already been answered by the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smtpgate.model.envelope import MailParams, RcptParams
from smtpgate.proto.replies import Reply


@dataclass(frozen=True, slots=True)
class NeedData:
    """The core needs more bytes from the client before it can go on."""


@dataclass(frozen=True, slots=True)
class Hello:
    """EHLO or HELO: reply with ``ServerConnection.ehlo_reply`` or a refusal."""

    extended: bool
    name: str


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM; ``sender`` is ``""`` for the null reverse-path."""

    sender: str
    params: MailParams = field(default_factory=MailParams)


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO for one recipient; a source route, if any, is already dropped."""

    recipient: str
    params: RcptParams = field(default_factory=RcptParams)


@dataclass(frozen=True, slots=True)
class DataRequested:
    """The DATA command: reply 354 to receive the body, or refuse it."""


@dataclass(frozen=True, slots=True)
class MessageData:
    """A piece of the message body, dot-unstuffed, line endings as sent (CRLF)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageComplete:
    """The body has ended cleanly (DATA or the last BDAT): reply with the verdict."""

    size: int


@dataclass(frozen=True, slots=True)
class MessageRejected:
    """The body broke a rule; the core has answered ``reply``. Drop the spool."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET: the transaction is dropped once the application replies."""


@dataclass(frozen=True, slots=True)
class Noop:
    """NOOP."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT: the connection closes after the reply."""


@dataclass(frozen=True, slots=True)
class Verify:
    """VRFY; RFC 5321 §3.5.3 allows 252 without disclosing anything."""

    argument: str


@dataclass(frozen=True, slots=True)
class Help:
    """HELP."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS: reply 220 and upgrade the transport, then call ``tls_started``."""


@dataclass(frozen=True, slots=True)
class AuthRequested:
    """AUTH with a mechanism the session advertised (RFC 4954 §4)."""

    mechanism: str
    initial_response: bytes | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A client's answer to a 334 challenge, base64-decoded."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AuthAborted:
    """The client cancelled the exchange with ``*``; the core has answered 501."""


Event = (
    NeedData
    | Hello
    | MailFrom
    | RcptTo
    | DataRequested
    | MessageData
    | MessageComplete
    | MessageRejected
    | Reset
    | Noop
    | Quit
    | Verify
    | Help
    | StartTls
    | AuthRequested
    | AuthResponse
    | AuthAborted
)
