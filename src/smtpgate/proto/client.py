"""Sans-IO SMTP client core: commands in, bytes out; the server's bytes in, events out.

The driver (``smtpgate.delivery.client``) writes ``data_to_send()`` to the
socket and feeds what it reads to ``receive_data()``; ``next_event()`` then
yields one :class:`Answer` per reply, paired with the command it answers,
in order. Rules kept here:

* Replies are parsed strictly (RFC 5321 §4.2): three digits 200-599, the
  same code on every line of a multi-line reply, ``-`` for every line but the
  last. The enhanced status code (RFC 2034 §4) is taken when its class
  matches the reply code. A reply that breaks these rules, a line over
  ``max_line`` octets, more than ``max_lines`` lines or more than
  ``max_reply`` octets is a :class:`ServerBroken` event: the connection must be
  closed (never an unbounded buffer, never an exception).
* Commands are pipelined only when the server offered PIPELINING (RFC 2920):
  otherwise each waits for the previous reply, and EHLO, STARTTLS, AUTH,
  DATA's end, BDAT LAST and QUIT end a group (§3.1). Driving the core out of
  order is our bug: ``ProtocolUsageError``.
* After ``220`` to STARTTLS, anything already received is discarded: it came
  before the handshake, in the clear (RFC 3207 §4.2, CVE-2011-0411's client
  side). The extensions are forgotten until the next EHLO (§4.2).
* A DATA body is dot-stuffed (RFC 5321 §4.5.2) and streamed in pieces; a
  missing final CRLF is added before the ``.``. BDAT (RFC 3030) needs no
  stuffing.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass

from smtpgate.errors import ProtocolUsageError
from smtpgate.proto.replies import Reply

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
# RFC 2920 §3.1: commands after which the client waits before sending more
_GROUP_ENDS = frozenset({"EHLO", "HELO", "STARTTLS", "AUTH", "DATA", "END", "BDAT LAST", "QUIT"})


@dataclass(frozen=True, slots=True)
class ClientLimits:
    max_line: int = 4096  # octets in one reply line (RFC 5321 §4.5.3.1.5 says 512)
    max_lines: int = 100  # lines in one reply (EHLO lists a few dozen at most)
    max_reply: int = 65536  # octets in one reply


@dataclass(frozen=True, slots=True)
class Answer:
    """The server's reply to ``command`` ("GREETING", "EHLO", "MAIL", "RCPT",
    "DATA", "END" for the end of a DATA body, "BDAT", "BDAT LAST", ...)."""

    command: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class ServerBroken:
    """The server broke the protocol (or closed): close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class NeedData:
    """More bytes from the server are needed."""


ClientEvent = Answer | ServerBroken | NeedData
NEED_DATA = NeedData()


def parse_reply(lines: list[bytes]) -> Reply | str:
    """Raw reply lines (without line ends) as a :class:`Reply`, or why not."""
    code_text = lines[0][:3].decode("ascii", "replace")
    if not (code_text.isascii() and code_text.isdigit()) or not 200 <= int(code_text) <= 599:
        return f"unintelligible reply {lines[0][:60]!r}"
    if any(line[:3] != lines[0][:3] for line in lines):
        return f"reply lines with different codes {lines[0][:3]!r} and others"
    code = int(code_text)
    texts = [line[4:].decode("utf-8", "replace") for line in lines]
    status: str | None = None
    first_word = texts[0].split(" ", 1)[0]
    if _STATUS.match(first_word) and first_word[0] == code_text[0]:
        status = first_word
        texts = [t.split(" ", 1)[1] if t.startswith(first_word + " ") else t for t in texts]
    texts = [t.replace("\r", "") or "-" for t in texts]
    if any("\n" in t for t in texts):  # not from _ReplyReader: let Reply refuse it
        return Reply(code, status, tuple(texts))
    # Every rule of Reply.__post_init__ holds: the code is 200-599, the status
    # matches _STATUS (the same pattern) and the code's class, there is a line
    # and no line holds CR or LF.
    return Reply._checked(code, status, tuple(texts))


class _ReplyReader:
    """Splits the server's bytes into replies, within the limits."""

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.buffer = bytearray()
        self.lines: list[bytes] = []
        self.size = 0

    def next(self) -> Reply | str | None:
        """A complete reply, a reason the input is broken, or None for more bytes."""
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > self.limits.max_line:
                    return f"reply line longer than {self.limits.max_line} octets"
                return None
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            self.size += end + 1
            self.lines.append(line)
            problem = self._check(line)
            if problem:
                return problem
            if line[3:4] != b"-":
                lines, self.lines, self.size = self.lines, [], 0
                return parse_reply(lines)

    def _check(self, line: bytes) -> str | None:
        if len(line) > self.limits.max_line:
            return f"reply line longer than {self.limits.max_line} octets"
        if len(line) < 3 or line[3:4] not in (b"", b" ", b"-"):
            return f"unintelligible reply {line[:60]!r}"
        if len(self.lines) > self.limits.max_lines:
            return f"reply of more than {self.limits.max_lines} lines"
        if self.size > self.limits.max_reply:
            return f"reply longer than {self.limits.max_reply} octets"
        return None


class ClientConnection:
    """One SMTP client conversation, without I/O (see the module's rules)."""

    def __init__(self, limits: ClientLimits | None = None) -> None:
        self._reader = _ReplyReader(limits or ClientLimits())
        self._out = bytearray()
        self._awaiting: deque[str] = deque(["GREETING"])
        self._broken: str | None = None
        self._tls_pending = False
        self._at_line_start = True
        self._last = b"\n"
        self.extensions: dict[str, str] = {}

    # -- the server's side -------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if data and not self._tls_pending:
            self._reader.buffer += data

    def receive_eof(self) -> None:
        self._broken = self._broken or "the server closed the connection"

    def next_event(self) -> ClientEvent:
        if self._awaiting and not self._tls_pending:
            found = self._reader.next()
            if isinstance(found, str):
                self._broken = found
            elif found is not None:
                return self._answer(self._awaiting.popleft(), found)
        if self._broken is not None:
            return ServerBroken(self._broken)
        return NEED_DATA

    def _answer(self, command: str, reply: Reply) -> Answer:
        if command == "EHLO" and reply.code == 250:
            self.extensions = _extensions(reply)
        elif command == "STARTTLS" and reply.code == 220:
            self._tls_pending = True  # nothing more is read until tls_started()
            self._reader.buffer.clear()
        return Answer(command, reply)

    # -- our side ------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def awaiting(self) -> int:
        """Replies still to come."""
        return len(self._awaiting)

    @property
    def expecting(self) -> str | None:
        """The command the next reply will answer, if any."""
        return self._awaiting[0] if self._awaiting else None

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    def _send(self, command: str, line: bytes) -> None:
        if self._tls_pending:
            raise ProtocolUsageError("the TLS handshake comes first after 220 to STARTTLS")
        if self._awaiting and not self._may_pipeline():
            raise ProtocolUsageError(f"{command} before the reply to {self._awaiting[-1]}")
        self._out += line
        self._awaiting.append(command)

    def _may_pipeline(self) -> bool:
        return self.pipelining and self._awaiting[-1] not in (_GROUP_ENDS | {"GREETING"})

    def ehlo(self, name: str) -> None:
        self._send("EHLO", f"EHLO {name}\r\n".encode("ascii"))

    def helo(self, name: str) -> None:
        self.extensions = {}
        self._send("HELO", f"HELO {name}\r\n".encode("ascii"))

    def starttls(self) -> None:
        self._send("STARTTLS", b"STARTTLS\r\n")

    def tls_started(self) -> None:
        """The handshake succeeded: say EHLO again, the extensions may differ."""
        self._tls_pending = False
        self.extensions = {}

    def auth_plain(self, username: str, password: str) -> None:
        """AUTH PLAIN with an initial response (RFC 4616, RFC 4954 §4)."""
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
        self._send("AUTH", f"AUTH PLAIN {token}\r\n".encode("ascii"))

    def command(self, name: str, line: str) -> None:
        """Any other command (MAIL, RCPT, RSET, NOOP, QUIT, DATA), ``line`` without CRLF."""
        if "\r" in line or "\n" in line:
            raise ProtocolUsageError("a command line must not contain CR or LF")
        self._send(name, line.encode("utf-8") + b"\r\n")
        if name == "DATA":
            self._at_line_start, self._last = True, b"\n"

    def body(self, chunk: bytes) -> None:
        """A piece of a DATA body (after 354), dot-stuffed as it goes."""
        if chunk:
            self._out += stuff_dots(chunk, self._at_line_start)
            self._at_line_start = chunk.endswith(b"\n")
            self._last = chunk[-1:]

    def end_body(self) -> None:
        """The end of a DATA body; its reply is answered as "END"."""
        self._out += b".\r\n" if self._last == b"\n" else b"\r\n.\r\n"
        self._awaiting.append("END")

    def bdat(self, chunk: bytes, last: bool) -> None:
        """One BDAT chunk (RFC 3030 §2); the last one is answered as "BDAT LAST"."""
        name = "BDAT LAST" if last else "BDAT"
        self._send(name, f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode())
        self._out += chunk


def _extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) and their parameters (RFC 5321 §4.1.1.1)."""
    found = {}
    for line in reply.lines[1:]:
        keyword, _, value = line.partition(" ")
        if keyword.isascii():
            found[keyword.upper()] = value
    return found


def stuff_dots(chunk: bytes, at_line_start: bool) -> bytes:
    """Double every dot that starts a line (RFC 5321 §4.5.2)."""
    stuffed = chunk.replace(b"\n.", b"\n..")
    if at_line_start and stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed
