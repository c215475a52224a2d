"""A small streaming SMTP client: commands in order, body straight from a file.

Why our own rather than aiosmtplib here: the body must stream from the spool
file in fixed-size pieces (a 50 MB message must not be read into memory), and
aiosmtplib takes the message as one bytes object.

Rules kept here:

* Outbound data never contains a bare CR, bare LF or NUL: the spool holds
  only bodies that passed the inbound checks, and the DATA encoder adds a
  final CRLF when the body lacks one (RFC 5321 §4.1.1.4).
* Dot-stuffing per RFC 5321 §4.5.2; BDAT (RFC 3030) when the server offers
  CHUNKING, which needs no stuffing.
* Reply lines are parsed per RFC 5321 §4.2; an enhanced status code (RFC 2034)
  is taken when its class matches the reply code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import ssl

from smtpgate.errors import DeliveryError
from smtpgate.proto.replies import Reply
from smtpgate.spool import Body

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
CHUNK = 65536


def parse_reply_lines(lines: list[bytes]) -> Reply:
    """Turn raw reply lines (without CRLF) into a :class:`Reply`."""
    code_text = lines[0][:3].decode("ascii", "replace")
    if not code_text.isdigit() or not 200 <= int(code_text) <= 599:
        raise DeliveryError(f"unintelligible reply {lines[0][:60]!r}", permanent=False)
    code = int(code_text)
    texts = [line[4:].decode("utf-8", "replace") for line in lines]
    status: str | None = None
    first_word = texts[0].split(" ", 1)[0]
    if _STATUS.match(first_word) and first_word[0] == code_text[0]:
        status = first_word
        texts = [t.split(" ", 1)[1] if t.startswith(first_word + " ") else t for t in texts]
    cleaned = tuple(t.replace("\r", "").replace("\n", "") or "-" for t in texts)
    return Reply(code, status, cleaned)


class SmtpClient:
    """One outbound SMTP connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.tls: str | None = None
        self.peer_address = ""
        self.peer_port = 0
        self.verified = False  # the peer's certificate passed chain and name checks

    @classmethod
    async def connect(  # noqa: PLR0913 - where, how long, and how securely
        cls,
        host: str,
        port: int,
        *,
        timeout: float,
        command_timeout: float,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> SmtpClient:
        """Open a connection (TLS from the first byte when ``tls`` is given)."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=tls,
                    limit=2**16,
                    server_hostname=(server_hostname or host) if tls else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise DeliveryError(f"cannot connect to {host}:{port}: {exc}", permanent=False) from exc
        client = cls(reader, writer, command_timeout)
        client.peer_address, client.peer_port = host, port
        client._note_tls()
        return client

    def _note_tls(self) -> None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            cipher = ssl_object.cipher()
            self.tls = f"{ssl_object.version()} {cipher[0] if cipher else '?'}"

    async def read_reply(self, timeout: float | None = None) -> Reply:
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(timeout or self.timeout):
                while True:
                    line = (await self.reader.readuntil(b"\n")).rstrip(b"\r\n")
                    lines.append(line)
                    if len(line) < 4 or line[3:4] != b"-":
                        break
                    if len(lines) > 100:
                        raise DeliveryError("reply has too many lines", permanent=False)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise DeliveryError(
                f"connection lost while reading reply: {e!r}", permanent=False
            ) from e
        return parse_reply_lines(lines)

    def _write(self, data: bytes) -> None:
        """Write, or fail as a lost connection (uvloop raises RuntimeError on a closed
        transport; asyncio's would drop the data silently)."""
        if self.writer.is_closing():
            raise DeliveryError("connection lost (closed by the peer)", permanent=False)
        try:
            self.writer.write(data)
        except RuntimeError as exc:
            raise DeliveryError(f"connection lost: {exc}", permanent=False) from exc

    async def command(self, line: str, timeout: float | None = None) -> Reply:
        self._write(line.encode("utf-8") + b"\r\n")
        return await self.read_reply(timeout)

    async def hello(self, name: str) -> Reply:
        """EHLO, falling back to HELO; records the extensions offered."""
        reply = await self.command(f"EHLO {name}")
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, value = line.partition(" ")
                self.extensions[keyword.upper()] = value
            return reply
        reply = await self.command(f"HELO {name}")
        self.extensions = {}
        return reply

    async def pipeline(self, lines: list[str]) -> list[Reply]:
        """Send commands in one write (RFC 2920) and read their replies in order."""
        self._write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))
        return [await self.read_reply() for _ in lines]

    async def auth_plain(self, username: str, password: str) -> Reply:
        """AUTH PLAIN with an initial response (RFC 4616, RFC 4954 §4)."""
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
        self._write(f"AUTH PLAIN {token}\r\n".encode("ascii"))
        return await self.read_reply()

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            raise DeliveryError(f"STARTTLS refused: {reply.text()}", permanent=False)
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.start_tls(context, server_hostname=server_hostname)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise DeliveryError(f"TLS handshake failed: {exc}", permanent=False) from exc
        self._note_tls()

    async def send_body(self, body: Body, data_end_timeout: float) -> Reply:
        """DATA or BDAT, whichever the server supports; returns the final reply."""
        if "CHUNKING" in self.extensions:
            return await self._send_bdat(body, data_end_timeout)
        return await self._send_data(body, data_end_timeout)

    async def _send_data(self, body: Body, data_end_timeout: float) -> Reply:
        reply = await self.command("DATA")
        if reply.code != 354:
            return reply
        return await self.send_data_body(body, data_end_timeout)

    async def send_data_body(self, body: Body, data_end_timeout: float) -> Reply:
        """The body after a 354: dot-stuffed, ended with CRLF.CRLF; the final reply."""
        at_line_start, last = True, b"\n"
        for chunk in body.chunks(CHUNK):
            self._write(stuff_dots(chunk, at_line_start))
            at_line_start = chunk.endswith(b"\n")
            last = chunk[-1:]
            await self._drain()
        self._write(b".\r\n" if last == b"\n" else b"\r\n.\r\n")
        return await self.read_reply(data_end_timeout)

    async def _send_bdat(self, body: Body, data_end_timeout: float) -> Reply:
        sent = 0
        for chunk in itertools.chain(body.chunks(CHUNK * 16), [b""] if body.size == 0 else []):
            sent += len(chunk)
            last = sent >= body.size
            self._write(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode())
            self._write(chunk)
            reply = await self.read_reply(data_end_timeout if last else None)
            if last or reply.code != 250:
                return reply
        raise DeliveryError("body ended early", permanent=False)

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except (OSError, TimeoutError) as exc:
            raise DeliveryError(f"connection lost while sending: {exc!r}", permanent=False) from exc

    async def close(self) -> None:
        """QUIT politely if possible, then close; never raises.

        The transport may already be closed (a failed TLS handshake closes it, and
        uvloop's transports raise RuntimeError on a write after that)."""
        if not self.writer.is_closing():
            try:
                async with asyncio.timeout(5):
                    self.writer.write(b"QUIT\r\n")
                    await self.reader.read(512)
            except (OSError, TimeoutError, RuntimeError, ssl.SSLError):
                pass
        self.writer.close()
        with contextlib.suppress(OSError, RuntimeError, ssl.SSLError):
            await self.writer.wait_closed()


def stuff_dots(chunk: bytes, at_line_start: bool) -> bytes:
    """Double every dot that starts a line (RFC 5321 §4.5.2)."""
    stuffed = chunk.replace(b"\n.", b"\n..")
    if at_line_start and stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed
