"""Virus scanning by ClamAV's clamd over its INSTREAM command.

A small client of our own over asyncio's socket calls rather than ``aioclamd``
(1.1.0): that one speaks TCP only (Debian's clamd listens on a unix socket by
default), reads its input from a file object 1 KiB at a time through a thread
each, and has no notion of the gateway's size decision. Ours streams the
spooled body as it is (``SpooledBody.chunks``: a 50 MB message is never read
into memory), over ``tcp://HOST:PORT`` or ``unix:/PATH``.

The protocol (clamd(8), "INSTREAM"): ``zINSTREAM\\0``, then chunks, each
preceded by its length as 4 octets in network order, then a zero length;
clamd answers one NUL-terminated line: ``stream: OK``, ``stream: NAME
FOUND``, or ``INSTREAM size limit exceeded. ERROR`` (more than its
``StreamMaxLength``; it may close the connection while we still write).

Decisions (``virus`` settings): infected → 550 5.7.1 naming the signature, or
quarantine; clean → ``X-Virus-Scanned``; larger than ``max_size`` or clamd's
limit → ``over_limit`` (accept with ``X-Virus-Status: unchecked (too large)``,
reject, or tempfail: never silently "clean"); clamd unreachable, slow or
answering nonsense → ``fail`` (open: accepted with ``X-Virus-Status:
unchecked``; closed: 451 4.7.1). An outage is logged once, its end too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterator

from smtpgate.config.schema import GatewayConfig, VirusSettings, parse_clamd_address
from smtpgate.content.pipeline import MessageFacts
from smtpgate.content.verdict import ScanResult
from smtpgate.observe.log import get_logger
from smtpgate.proto.replies import Reply
from smtpgate.spool import SpooledBody

log = get_logger("smtpgate.content.clamd")

NAME = "clamd"
CHUNK = 64 * 1024  # octets per INSTREAM chunk (clamd's StreamMaxLength is far larger)
REPLY_LIMIT = 4096  # octets of clamd's answer we are willing to read
SIZE_LIMIT = "INSTREAM size limit exceeded"
UNAVAILABLE = Reply.of(451, "4.7.1", "Virus scanner unavailable, try again later")
TOO_LARGE_TEMPFAIL = Reply.of(451, "4.7.1", "Message too large for the virus scanner right now")
TOO_LARGE = Reply.of(552, "5.3.4", "Message too large to be checked for viruses")


class ClamdError(Exception):
    """clamd could not be asked, or answered nothing we understand."""


class OverLimit(Exception):  # noqa: N818 - a verdict, not a failure
    """clamd refused the stream as larger than its StreamMaxLength."""


def frames(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The INSTREAM octets for ``chunks``: command, length-prefixed chunks, end."""
    yield b"zINSTREAM\0"
    for chunk in chunks:
        for start in range(0, len(chunk), CHUNK):
            piece = chunk[start : start + CHUNK]
            yield struct.pack("!I", len(piece)) + piece
    yield struct.pack("!I", 0)


def parse_reply(line: str) -> str | None:
    """None for a clean stream, the signature name when one was found; raises
    :class:`OverLimit` or :class:`ClamdError` for the rest."""
    if line.startswith(SIZE_LIMIT):
        raise OverLimit(line)
    if line == "stream: OK":
        return None
    if line.startswith("stream: ") and line.endswith(" FOUND"):
        return line.removeprefix("stream: ").removesuffix(" FOUND").strip() or "unknown"
    raise ClamdError(f"unexpected answer from clamd: {line[:200]!r}")


async def _connect(address: str) -> socket.socket:
    """A connected non-blocking socket to clamd (IP addresses only: no lookup)."""
    where = parse_clamd_address(address)
    loop = asyncio.get_running_loop()
    if isinstance(where, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = where
    else:
        family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        target = where
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, target)
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_reply(sock: socket.socket) -> str:
    """clamd's NUL-terminated answer, at most :data:`REPLY_LIMIT` octets. What
    the kernel received before a reset is still read: the answer comes first."""
    loop = asyncio.get_running_loop()
    raw = b""
    while b"\0" not in raw:
        if len(raw) > REPLY_LIMIT:
            raise ClamdError("clamd's answer is too long")
        try:
            piece = await loop.sock_recv(sock, 1024)
        except ConnectionResetError:
            piece = b""
        if not piece:
            if not raw:
                raise ClamdError("clamd closed the connection without an answer")
            break
        raw += piece
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


async def instream(address: str, chunks: Iterator[bytes]) -> str | None:
    """Scan a stream with clamd at ``address``: None when clean, else the
    signature. Raises :class:`OverLimit`, :class:`ClamdError` or OSError; the
    caller bounds the time.

    On the socket itself, not a transport: clamd answers early (over its limit)
    and closes with our octets unread, so its kernel resets the connection; a
    transport that meets the reset while writing closes at once and throws
    away the answer that had already arrived, and the message was deferred
    as "clamd unavailable" instead of being treated as too large."""
    loop = asyncio.get_running_loop()
    sock = await _connect(address)
    answer = asyncio.ensure_future(_read_reply(sock))
    try:
        try:
            for frame in frames(chunks):
                if answer.done():
                    break
                await loop.sock_sendall(sock, frame)
        except (ConnectionResetError, BrokenPipeError):
            pass  # clamd stopped reading (e.g. over its limit): its answer says why
        return parse_reply(await answer)
    finally:
        if answer.done() and not answer.cancelled():
            answer.exception()  # retrieved: a failure is reported by what we raise
        answer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await answer
        sock.close()


async def ping(address: str, timeout: float = 5.0) -> bool:
    """Whether clamd answers ``zPING`` with ``PONG`` (its databases loaded)."""
    try:
        async with asyncio.timeout(timeout):
            sock = await _connect(address)
            try:
                await asyncio.get_running_loop().sock_sendall(sock, b"zPING\0")
                return await _read_reply(sock) == "PONG"
            finally:
                sock.close()
    except (OSError, TimeoutError, ClamdError):
        return False


class ClamdScanner:
    """The ``virus`` check: every message when ``virus.clamd`` is set."""

    name = NAME

    def __init__(self) -> None:
        self.down: str | None = None  # why clamd is unreachable, during an outage

    def applies(self, facts: MessageFacts, config: GatewayConfig) -> bool:
        return bool(config.virus.clamd)

    async def scan(
        self, facts: MessageFacts, body: SpooledBody, config: GatewayConfig
    ) -> ScanResult:
        settings = config.virus
        if body.size > settings.max_size:
            return self._over_limit(settings, f"{body.size} octets > virus.max_size")
        try:
            async with asyncio.timeout(settings.timeout):
                found = await instream(settings.clamd, body.chunks(CHUNK))
        except OverLimit:
            self._up()
            return self._over_limit(settings, "over clamd's StreamMaxLength")
        except (OSError, TimeoutError, ClamdError) as exc:
            return self._unavailable(settings, exc)
        self._up()
        if found is None:
            return ScanResult(
                NAME,
                headers=(("X-Virus-Scanned", f"clamd on {facts.hostname}: clean"),),
                detail={"virus": "clean"},
            )
        reason = f"virus {found}"
        detail = {"virus": "infected", "signature": found}
        if settings.infected == "quarantine":
            return ScanResult(NAME, "quarantine", reason=reason, detail=detail)
        reply = Reply.of(550, "5.7.1", f"Message contains a virus ({found})")
        return ScanResult(NAME, "reject", reply, reason=reason, detail=detail)

    def _over_limit(self, settings: VirusSettings, why: str) -> ScanResult:
        detail = {"virus": "unchecked", "why": why}
        reason = f"too large to scan ({why})"
        if settings.over_limit == "reject":
            return ScanResult(NAME, "reject", TOO_LARGE, reason=reason, detail=detail)
        if settings.over_limit == "tempfail":
            return ScanResult(NAME, "tempfail", TOO_LARGE_TEMPFAIL, reason=reason, detail=detail)
        header = ("X-Virus-Status", "unchecked (too large)")
        return ScanResult(NAME, headers=(header,), reason=reason, detail=detail)

    def _unavailable(self, settings: VirusSettings, exc: BaseException) -> ScanResult:
        why = "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
        if self.down is None:  # once per outage, not once per message
            log.error("clamd unavailable", clamd=settings.clamd, error=why, fail=settings.fail)
        self.down = why
        detail = {"virus": "unchecked", "why": why}
        reason = f"clamd unavailable ({why})"
        if settings.fail == "closed":
            return ScanResult(NAME, "tempfail", UNAVAILABLE, reason=reason, detail=detail)
        header = ("X-Virus-Status", "unchecked (scanner unavailable)")
        return ScanResult(NAME, headers=(header,), reason=reason, detail=detail)

    def _up(self) -> None:
        if self.down is not None:
            log.info("clamd reachable again", was=self.down)
            self.down = None
