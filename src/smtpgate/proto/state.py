"""What the protocol core remembers (the conversation's state, a session's
limits, the facts of the session and its transaction) and the pure decisions
made from it alone: the EHLO extensions and the start of an AUTH exchange."""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field

from smtpgate.proto import replies as r
from smtpgate.proto.body import BodyChecker, BodyLimits
from smtpgate.proto.events import AuthRequested
from smtpgate.proto.grammar import ascii_upper
from smtpgate.proto.replies import Reply


class State(enum.Enum):
    """Where the conversation stands."""

    CONNECTED = "connected"  # greeting not yet sent
    REFUSED = "refused"  # 554 greeting: only QUIT is honoured (RFC 5321 §3.1)
    READY = "ready"  # greeting sent, no EHLO/HELO yet
    GREETED = "greeted"  # EHLO/HELO done, no transaction
    MAIL = "mail"  # sender accepted
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # receiving a DATA body
    BDAT = "bdat"  # receiving a BDAT chunk
    AUTH = "auth"  # inside a SASL exchange (RFC 4954 §4)
    TLS_PENDING = "tls-pending"  # 220 to STARTTLS sent, handshake not done
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Limits of one session; defaults follow Postfix where it has one."""

    max_command_line: int = 512  # RFC 5321 §4.5.3.1.4, including CRLF
    command_line_allowance: int = 1024  # extra room for MAIL/RCPT parameters
    max_auth_line: int = 12288  # RFC 4954 §4
    max_line_length: int = 8192  # body text line, including CRLF
    max_recipients: int = 1000  # Postfix smtpd_recipient_limit
    max_message_size: int = 10_240_000  # Postfix message_size_limit
    max_header_size: int = 102_400  # Postfix header_size_limit
    max_errors: int = 20  # Postfix smtpd_hard_error_limit
    max_pending_input: int = 65_536  # input kept while a command awaits its reply
    min_data_rate: int = 500  # octets/s that extend the body deadline (the session's)

    def body(self) -> BodyLimits:
        return BodyLimits(self.max_message_size, self.max_header_size, self.max_line_length)


@dataclass(slots=True)
class Transaction:
    """The mail transaction in progress (MAIL to the end of the body)."""

    smtputf8: bool = False
    recipients: int = 0
    used_bdat: bool = False
    checker: BodyChecker | None = None


@dataclass(slots=True)
class SessionFacts:
    """What the session has established: EHLO, what is offered, AUTH."""

    esmtp: bool = False
    offer_starttls: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    authenticated: bool = False
    txn: Transaction | None = None
    helo_name: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def extensions(limits: SessionLimits, *, starttls: bool, auth: tuple[str, ...]) -> list[str]:
    """The EHLO keywords (RFC 5321 §4.1.1.1) this session offers."""
    offered = [
        "PIPELINING",  # RFC 2920
        f"SIZE {limits.max_message_size}",  # RFC 1870
        "ENHANCEDSTATUSCODES",  # RFC 2034
        "8BITMIME",  # RFC 6152
        "SMTPUTF8",  # RFC 6531
        "CHUNKING",  # RFC 3030
        "DSN",  # RFC 3461
    ]
    if starttls:
        offered.append("STARTTLS")  # RFC 3207
    if auth:
        offered.append("AUTH " + " ".join(auth))  # RFC 4954
    return offered


def start_auth(session: SessionFacts, arg: str) -> AuthRequested | Reply:
    """``AUTH mechanism [initial-response]`` (RFC 4954 §4): the request, or the
    error reply when AUTH is not possible now or the argument is wrong."""
    if not session.auth_mechanisms:
        return r.AUTH_UNAVAILABLE
    if session.authenticated:
        return r.ALREADY_AUTHENTICATED
    if session.txn is not None:
        return r.AUTH_IN_TRANSACTION
    words = arg.split(" ")
    mechanism = ascii_upper(words[0])
    if mechanism not in session.auth_mechanisms or len(words) > 2:
        return r.AUTH_MECHANISM_UNKNOWN
    if len(words) == 1:
        return AuthRequested(mechanism, None)
    initial = b64(words[1]) if words[1] != "=" else b""  # "=": an empty response
    if initial is None:
        return r.AUTH_BAD_BASE64
    return AuthRequested(mechanism, initial)


def b64(text: str) -> bytes | None:
    """Strict base64 (RFC 4954 §4), or None."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
