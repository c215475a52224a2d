"""SMTP replies with enhanced status codes, and the replies the core sends itself.

Rules kept here:

* A reply code is three digits, 2xx-5xx (RFC 5321 §4.2).
* Every reply carries an enhanced status code (RFC 3463) whose class digit
  equals the reply's first digit (RFC 2034 §4), except the greeting and the
  EHLO/HELO reply, which RFC 2034 §3 exempts.
* Reply text never contains CR or LF; a multi-line reply is rendered as one
  byte string so that the session writes it in one write (RFC 5321 §4.2.1).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@functools.lru_cache(maxsize=1024)
def _made(code: int, status: str | None, lines: tuple[str, ...]) -> Reply:
    return Reply(code, status, lines)


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code, enhanced status code and one or more text lines."""

    code: int
    status: str | None
    lines: tuple[str, ...]
    _wire: bytes = field(init=False, repr=False, compare=False, default=b"")

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.status is not None:
            if not _STATUS.match(self.status):
                raise ValueError(f"bad enhanced status code: {self.status!r}")
            if self.status[0] != str(self.code)[0]:
                raise ValueError(f"status {self.status} does not match reply {self.code}")
        if not self.lines:
            raise ValueError("a reply needs at least one line of text")
        for line in self.lines:
            if "\r" in line or "\n" in line:
                raise ValueError("reply text must not contain CR or LF")
        object.__setattr__(self, "_wire", self._render())

    @classmethod
    def _checked(cls, code: int, status: str | None, lines: tuple[str, ...]) -> Reply:
        """A reply whose parts the caller has already checked against every rule
        of ``__post_init__`` (the client core's reply parser); the wire bytes are
        rendered only if asked for, which a received reply seldom is."""
        reply = object.__new__(cls)
        object.__setattr__(reply, "code", code)
        object.__setattr__(reply, "status", status)
        object.__setattr__(reply, "lines", lines)
        object.__setattr__(reply, "_wire", b"")
        return reply

    @classmethod
    def of(cls, code: int, status: str | None, *lines: str) -> Reply:
        """Build a reply: ``Reply.of(250, "2.1.0", "Ok")``. Replies are immutable,
        so the same parts give the same object (most replies are a few fixed
        ones, built again for every command: checked and rendered once)."""
        return _made(code, status, lines) if cls is Reply else cls(code, status, lines)

    def text(self) -> str:
        """The reply text as one string, the way logs and bounces show it."""
        prefix = f"{self.status} " if self.status else ""
        return f"{self.code} {prefix}" + " / ".join(self.lines)

    def to_bytes(self) -> bytes:
        """The wire bytes; every line but the last uses ``code-``."""
        wire = self._wire
        if not wire:  # never empty once rendered: made by _checked
            wire = self._render()
            object.__setattr__(self, "_wire", wire)
        return wire

    def _render(self) -> bytes:
        prefix = f"{self.status} " if self.status else ""
        last = len(self.lines) - 1
        out = [
            f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
            for i, line in enumerate(self.lines)
        ]
        return "".join(out).encode("utf-8")


# Replies the protocol core sends on its own (syntax, sequence and limits).
# Texts follow Postfix where it has one, so operators recognise them.
OK = Reply.of(250, "2.0.0", "Ok")
SENDER_OK = Reply.of(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply.of(250, "2.1.5", "Ok")
BYE = Reply.of(221, "2.0.0", "Bye")
START_INPUT = Reply.of(354, None, "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply.of(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = Reply.of(
    252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
HELP = Reply.of(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321")
UNRECOGNISED = Reply.of(502, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply.of(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = Reply.of(500, "5.5.2", "Error: line too long")
BARE_NEWLINE_COMMAND = Reply.of(500, "5.5.2", "Error: bare <CR> or <LF> received")
NUL_IN_COMMAND = Reply.of(500, "5.5.2", "Error: NUL character received")
NEED_HELO = Reply.of(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply.of(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply.of(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply.of(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = Reply.of(554, "5.5.1", "Error: no valid recipients")
BAD_SEQUENCE = Reply.of(503, "5.5.1", "Error: bad sequence of commands")
MIXED_DATA_BDAT = Reply.of(503, "5.5.1", "Error: DATA and BDAT cannot be mixed in one transaction")
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply.of(552, "5.3.4", "Error: message size exceeds fixed limit")
HEADER_TOO_BIG = Reply.of(552, "5.3.4", "Error: message header size exceeds fixed limit")
BODY_LINE_TOO_LONG = Reply.of(550, "5.6.0", "Error: message contains a line longer than allowed")
BARE_NEWLINE_DATA = Reply.of(550, "5.6.0", "Error: message contains bare <CR> or <LF>; closing")
BARE_NEWLINE_CHUNK = Reply.of(550, "5.6.0", "Error: message contains bare <CR> or <LF>")
NUL_IN_DATA = Reply.of(550, "5.6.0", "Error: message contains a NUL character")
TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Error: too many errors")
IMPROPER_PIPELINING = Reply.of(554, "5.5.0", "Error: improper command pipelining")
PREGREET = Reply.of(554, "5.5.0", "Error: SMTP protocol violation, data sent before greeting")
FORBIDDEN_COMMAND = Reply.of(521, "5.7.0", "Error: this is an SMTP server; goodbye")
STARTTLS_UNAVAILABLE = Reply.of(502, "5.5.1", "Error: STARTTLS not available")
ALREADY_TLS = Reply.of(503, "5.5.1", "Error: TLS already active")
AUTH_UNAVAILABLE = Reply.of(503, "5.5.1", "Error: authentication not enabled")
ALREADY_AUTHENTICATED = Reply.of(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply.of(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_MECHANISM_UNKNOWN = Reply.of(504, "5.5.4", "Error: unsupported authentication mechanism")
AUTH_CANCELLED = Reply.of(501, "5.7.0", "Authentication aborted")
AUTH_LINE_TOO_LONG = Reply.of(500, "5.5.6", "Authentication exchange line is too long")
AUTH_BAD_BASE64 = Reply.of(501, "5.5.2", "Error: malformed base64 in authentication")
SIZE_EXCEEDED_DECLARED = Reply.of(552, "5.3.4", "Error: message size exceeds fixed limit")
NON_ASCII_ADDRESS = Reply.of(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
