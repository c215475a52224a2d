"""The outbound connection: asyncio streams driving the sans-IO client core.

All protocol knowledge is in ``smtpgate.proto.client`` (commands, reply
parsing and limits, pipelining, dot-stuffing, STARTTLS rules) and
``smtpgate.proto.transaction`` (MAIL/RCPT/body and each recipient's
reply). This module only moves bytes, in one loop: write what the core has
to send, read until it has an answer, with a deadline per reply.

Why our own client rather than aiosmtplib: the body must stream from the
spool in fixed-size pieces (a 50 MB message is never read into memory), and
the protocol core is ours, tested against our server core.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator

from smtpgate.errors import DeliveryError, ProtocolUsageError
from smtpgate.model.envelope import MailParams, Recipient
from smtpgate.proto.client import Answer, ClientConnection, ServerBroken
from smtpgate.proto.replies import Reply
from smtpgate.proto.transaction import Done, SendBody, Transaction
from smtpgate.spool import Body

CHUNK = 65536  # DATA pieces; a BDAT chunk is 16 of them
READ = 65536
HIGH_WATER = 65536  # wait for the socket only with more than this unsent


class SmtpClient:
    """One outbound SMTP connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.core = ClientConnection()
        self.tls: str | None = None
        self.peer_address = ""
        self.peer_port = 0
        self.verified = False  # the peer's certificate passed chain and name checks
        self.verified_by = ""  # "dane" or "mta-sts": what the recipient domain published
        self.transactions = 0  # mail transactions done on this connection

    @property
    def extensions(self) -> dict[str, str]:
        return self.core.extensions

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

    # -- the loop: write what the core has, read until it has an answer ----------

    async def _flush(self) -> None:
        data = self.core.data_to_send()
        if not data:
            return
        if self.writer.is_closing():
            raise DeliveryError("connection lost (closed by the peer)", permanent=False)
        try:
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size() > HIGH_WATER:  # a body, mostly
                async with asyncio.timeout(self.timeout):
                    await self.writer.drain()
        except (OSError, TimeoutError, RuntimeError) as exc:  # uvloop: RuntimeError when closed
            raise DeliveryError(f"connection lost while sending: {exc!r}", permanent=False) from exc

    async def answer(self, timeout: float | None = None) -> Answer:
        """Send what is pending, then the next answer (within ``timeout``)."""
        await self._flush()
        # Pipelined replies often arrive in one read: one already buffered is
        # returned without the cost of arming a deadline (nothing is awaited).
        event = self.core.next_event()
        if isinstance(event, Answer):
            return event
        if isinstance(event, ServerBroken):
            raise DeliveryError(event.reason, permanent=False)
        try:
            async with asyncio.timeout(timeout or self.timeout):
                while True:
                    event = self.core.next_event()
                    if isinstance(event, Answer):
                        return event
                    if isinstance(event, ServerBroken):
                        raise DeliveryError(event.reason, permanent=False)
                    data = await self.reader.read(READ)
                    if data:
                        self.core.receive_data(data)
                    else:
                        self.core.receive_eof()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise DeliveryError(
                f"connection lost while reading reply: {exc!r}", permanent=False
            ) from exc

    # -- the steps -------------------------------------------------------------------

    async def greeting(self) -> Reply:
        return (await self.answer()).reply

    async def hello(self, name: str) -> Reply:
        """EHLO, falling back to HELO; the core records the extensions offered."""
        self.core.ehlo(name)
        reply = (await self.answer()).reply
        if reply.code == 250:
            return reply
        self.core.helo(name)
        return (await self.answer()).reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self.core.starttls()
        reply = (await self.answer()).reply
        if reply.code != 220:
            raise DeliveryError(f"STARTTLS refused: {reply.text()}", permanent=False)
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.start_tls(context, server_hostname=server_hostname)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise DeliveryError(f"TLS handshake failed: {exc}", permanent=False) from exc
        self.core.tls_started()
        self._note_tls()

    async def auth_plain(self, username: str, password: str) -> Reply:
        self.core.auth_plain(username, password)
        return (await self.answer()).reply

    async def transaction(
        self,
        sender: str,
        params: MailParams,
        recipients: list[Recipient],
        body: Body,
        data_end_timeout: float,
    ) -> tuple[Done, bool]:
        """One mail transaction; every recipient's reply, and whether the next hop
        took the DSN parameters."""
        flow = Transaction(self.core, sender, params, body.size, recipients)
        flow.begin()
        chunks: Iterator[tuple[bytes, bool]] | None = None
        while True:
            ending = self.core.expecting in ("END", "BDAT LAST")  # RFC 5321 §4.5.3.2.6
            step = flow.answer(await self.answer(data_end_timeout if ending else None))
            if isinstance(step, Done):
                return step, flow.dsn_passed_on
            if isinstance(step, SendBody) and step.kind == "DATA":
                await self._data_body(body)
            elif isinstance(step, SendBody):
                chunks = chunks or _bdat_chunks(body)
                self.core.bdat(*next(chunks))

    async def _data_body(self, body: Body) -> None:
        # Each piece is sent when the next one is read; the last goes out with
        # the end marker in the same write (one write for a small body).
        pending = False
        for chunk in body.chunks(CHUNK):
            if pending:
                await self._flush()
            self.core.body(chunk)
            pending = True
        self.core.end_body()

    async def close(self) -> None:
        """QUIT politely if possible, then close; never raises.

        The transport may already be closed (a failed TLS handshake closes it, and
        uvloop's transports raise RuntimeError on a write after that)."""
        if not self.writer.is_closing() and self.core.awaiting == 0:
            with contextlib.suppress(DeliveryError, ProtocolUsageError):
                self.core.command("QUIT", "QUIT")
                await self.answer(5)
        self.writer.close()
        with contextlib.suppress(OSError, RuntimeError, ssl.SSLError):
            await self.writer.wait_closed()


def _bdat_chunks(body: Body) -> Iterator[tuple[bytes, bool]]:
    """(chunk, last) for BDAT; an empty body is one empty LAST chunk."""
    sent = 0
    for chunk in body.chunks(CHUNK * 16):
        sent += len(chunk)
        yield chunk, sent >= body.size
    if body.size == 0:
        yield b"", True
