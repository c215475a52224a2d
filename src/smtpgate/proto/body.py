"""Message body framing (DATA and BDAT) and the checks every body passes.

Rules kept here:

* Only ``CRLF.CRLF`` ends DATA (RFC 5321 §4.1.1.4). A body with a bare CR or
  bare LF is never accepted: as soon as anything that *some* receiver could
  read as an end of data (``<CR|LF>.<CR|LF>``) follows, the message is
  refused and the connection closed, because client and server may now
  disagree about where commands begin (SMTP smuggling, CVE-2023-51766 and
  relatives). This mirrors Postfix's ``smtpd_forbid_bare_newline = reject``.
  The search covers every octet received, including whole lines taken in
  the same block as the first bare newline, so the close happens in the
  read that brings the loose end, not at the next real end or a timeout.
* A line that starts with a dot loses that dot (RFC 5321 §4.5.2).
* BDAT chunks are counted octets (RFC 3030 §2) and are never unstuffed; they
  pass the same checks because the next hop may receive the body as DATA.
* Size, header size and line length limits stop the body from being handed
  on, but framing goes on so the client gets one clear reply at the end.

Work is done on whole blocks with ``bytes`` methods, never per octet in Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtpgate.proto.replies import (
    BODY_LINE_TOO_LONG,
    HEADER_TOO_BIG,
    MESSAGE_TOO_BIG,
    NUL_IN_DATA,
    Reply,
)

# Anything a lenient receiver could take for the end of DATA.
_LOOSE_END = re.compile(rb"[\r\n]\.[\r\n]")


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """Limits on one message body, in octets."""

    max_size: int
    max_header_size: int
    max_line_length: int  # including the CRLF, as RFC 5321 §4.5.3.1.6 counts


class BodyChecker:
    """Checks body octets as they stream: size, header, line length, CR/LF, NUL.

    ``problem`` is the first rule broken (the reply to send), ``bare_newline``
    says a bare CR or LF was seen. Once a problem is found nothing more is
    worth keeping, and ``accepting`` turns false.
    """

    def __init__(self, limits: BodyLimits) -> None:
        self.limits = limits
        self.size = 0
        self.problem: Reply | None = None
        self.bare_newline = False
        self._pending_cr = False
        self._line_len = 0
        self._header_open = True
        self._header_size = 0
        self._tail = b"\r\n"  # the body starts as if after a line end

    @property
    def accepting(self) -> bool:
        return self.problem is None and not self.bare_newline

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        self._check_newlines(data)
        if self.problem is not None:
            return
        if self.size > self.limits.max_size:
            self.problem = MESSAGE_TOO_BIG
        elif b"\x00" in data:
            self.problem = NUL_IN_DATA
        elif self._line_too_long(data):
            self.problem = BODY_LINE_TOO_LONG
        elif self._header_open and self._header_too_big(data):
            self.problem = HEADER_TOO_BIG

    def finish(self) -> None:
        """The body has ended: a CR left hanging at the end is a bare CR."""
        if self._pending_cr:
            self.bare_newline = True

    def _check_newlines(self, data: bytes) -> None:
        chunk = b"\r" + data if self._pending_cr else data
        self._pending_cr = chunk.endswith(b"\r")
        if self._pending_cr:
            chunk = chunk[:-1]
        pairs = chunk.count(b"\r\n")
        if chunk.count(b"\r") != pairs or chunk.count(b"\n") != pairs:
            self.bare_newline = True

    def _line_too_long(self, data: bytes) -> bool:
        limit = self.limits.max_line_length
        first = data.find(b"\n")
        if first < 0:
            self._line_len += len(data)
            return self._line_len >= limit
        if self._line_len + first + 1 > limit:
            return True
        last = data.rfind(b"\n")
        self._line_len = len(data) - last - 1
        if last - first > limit and max(map(len, data[first + 1 : last].split(b"\n"))) >= limit:
            return True
        return self._line_len >= limit

    def _header_too_big(self, data: bytes) -> bool:
        window = self._tail + data
        end = window.find(b"\r\n\r\n")
        if end >= 0:
            self._header_open = False
            self._header_size += max(0, end + 2 - len(self._tail))
        else:
            self._header_size += len(data)
            self._tail = window[-3:]
        return self._header_size > self.limits.max_header_size


@dataclass(frozen=True, slots=True)
class Step:
    """What one framing step produced."""

    data: bytes = b""  # body octets to hand on (empty once a problem is known)
    finished: bool = False  # the body has ended
    must_close: bool = False  # the end was ambiguous: close the connection


class DotFramer:
    """Frames a DATA body out of the connection's input buffer."""

    def __init__(self, checker: BodyChecker) -> None:
        self.checker = checker
        self._context = b"\n"  # octets before the buffer, for loose-end search
        self._skip_line = False  # dropping the rest of an over-long line

    def take(self, buf: bytearray) -> Step:
        """Consume what can be framed from ``buf``; leave what follows the end."""
        if self._skip_line and not self._skip_to_line_end(buf):
            return Step()
        if not self.checker.bare_newline:
            step = self._take_lines(buf)
            if step.finished or not self.checker.bare_newline:
                return step
        return self._take_tainted(buf)

    def _take_lines(self, buf: bytearray) -> Step:
        if buf.startswith(b".\r\n"):
            del buf[:3]
            return self._finish(b"")
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            block = bytes(buf[: end + 2])
            del buf[: end + 5]
            return self._finish(block)
        end = buf.rfind(b"\r\n")
        block, context = b"", self._context
        if end >= 0:
            block = bytes(buf[: end + 2])
            del buf[: end + 2]
            self._context = b"\n"
        data = self._deliver(block)
        if self.checker.bare_newline and _LOOSE_END.search(context + block):
            return Step(finished=True, must_close=True)  # a fake end inside this block
        self._check_partial_line(buf)
        return Step(data=data)

    def _check_partial_line(self, buf: bytearray) -> None:
        """A line still open may already show a bare newline or be too long."""
        if b"\n" in buf or b"\r" in buf[:-1]:
            self.checker.bare_newline = True
        elif len(buf) >= self.checker.limits.max_line_length:
            if self.checker.problem is None:
                self.checker.problem = BODY_LINE_TOO_LONG
            self._skip_line = True
            keep = buf.endswith(b"\r")
            buf.clear()
            if keep:
                buf.append(0x0D)

    def _skip_to_line_end(self, buf: bytearray) -> bool:
        end = buf.find(b"\r\n")
        if b"\n" in (buf if end < 0 else buf[:end]):
            self.checker.bare_newline = True
            self._skip_line = False
            return True
        if end < 0:
            keep = buf.endswith(b"\r")
            buf.clear()
            if keep:
                buf.append(0x0D)
            return False
        del buf[: end + 2]
        self._skip_line = False
        self._context = b"\n"
        return True

    def _deliver(self, block: bytes) -> bytes:
        if not block:
            return b""
        if block.startswith(b"."):
            block = block[1:]
        block = block.replace(b"\r\n.", b"\r\n")
        self.checker.feed(block)
        return block if self.checker.accepting else b""

    def _finish(self, block: bytes) -> Step:
        data = self._deliver(block)
        self.checker.finish()
        return Step(data=data, finished=True, must_close=self.checker.bare_newline)

    def _take_tainted(self, buf: bytearray) -> Step:
        """A bare newline was seen: stop at the first loose end and close."""
        window = self._context + bytes(buf)
        buf.clear()
        if _LOOSE_END.search(window):
            return Step(finished=True, must_close=True)
        self._context = window[-2:]
        return Step()


class ChunkFramer:
    """Frames one BDAT chunk of a known octet count (RFC 3030 §2)."""

    def __init__(self, checker: BodyChecker | None, size: int) -> None:
        self.checker = checker
        self.remaining = size

    def take(self, buf: bytearray) -> Step:
        count = min(self.remaining, len(buf))
        data = bytes(buf[:count])
        del buf[:count]
        self.remaining -= count
        if self.checker is None:
            return Step(finished=self.remaining == 0)
        self.checker.feed(data)
        kept = data if self.checker.accepting else b""
        return Step(data=kept, finished=self.remaining == 0)
