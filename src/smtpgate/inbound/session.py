"""One inbound SMTP session: socket ↔ protocol core ↔ handler.

The session owns the only loop that writes to the socket (the chasquid
shape): it reads, feeds the core, asks the handler about each command event,
and writes the replies of a pipelined group in one write. It decides nothing
about relay or delivery itself; the :class:`SessionHandler` does.

Rules kept here:

* Phase timeouts (RFC 5321 §4.5.3.2): ``command`` while waiting for a
  command, ``data`` between reads of a body, reset whenever bytes arrive;
  on expiry ``421 4.4.2`` and close.
* On a ``require-starttls`` listener MAIL before STARTTLS gets
  ``530 5.7.0`` (RFC 3207 §4).
* A body streams to a spool file; memory stays at one read buffer.
* On shutdown an idle session gets ``421 4.3.2``; a session receiving or
  handing on a message finishes it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from smtpgate.inbound.trace import TraceFacts, received_header
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.observe.log import get_logger
from smtpgate.proto import events as ev
from smtpgate.proto import replies as r
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import ServerConnection, SessionLimits, State
from smtpgate.spool import SpooledBody, new_queue_id

log = get_logger("smtpgate.session")

READ_SIZE = 65536
TIMEOUT = Reply.of(421, "4.4.2", "Error: timeout exceeded")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Service shutting down, try again later")
MUST_STARTTLS = Reply.of(530, "5.7.0", "Must issue a STARTTLS command first")
SPOOL_FAILED = Reply.of(451, "4.3.0", "Error: queue file write error")


@dataclass
class SessionInfo:
    """Facts about one session that handlers read (and policy later extends)."""

    listener: str
    client_ip: str
    client_port: int
    hostname: str
    tls: str | None = None
    helo: str = ""
    esmtp: bool = False
    auth_user: str | None = None
    sender: str | None = None
    mail_event: ev.MailFrom | None = None
    recipients: list[Recipient] = field(default_factory=list)

    def envelope(self) -> Envelope:
        params = self.mail_event.params if self.mail_event else ev.MailFrom("").params
        return Envelope(
            sender=self.sender or "",
            recipients=tuple(self.recipients),
            mail_params=params,
            helo=self.helo,
            client_ip=self.client_ip,
            client_port=self.client_port,
            tls=self.tls,
            auth_user=self.auth_user,
        )


class SessionHandler(Protocol):
    """What the session asks about; the gateway and the sink each provide one."""

    async def on_connect(self, info: SessionInfo) -> Reply | None:
        """Before the greeting: ``None`` for 220, or a 554/421 refusal."""

    async def on_command(self, info: SessionInfo, event: ev.Event) -> Reply | None:
        """Per command: ``None`` for the default answer, or the reply to give."""

    async def on_message(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        """A complete, checked body: hand it on and return the final reply."""


@dataclass(frozen=True)
class SessionSettings:
    limits: SessionLimits
    command_timeout: float
    data_timeout: float
    tls_handshake_timeout: float
    spool_dir: Path
    tls_context: ssl.SSLContext | None  # None: STARTTLS not offered
    require_tls: bool


class Session:
    """Drives one connection from greeting to close."""

    def __init__(  # noqa: PLR0913 - a session is made of exactly these parts
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        info: SessionInfo,
        handler: SessionHandler,
        settings: SessionSettings,
        *,
        tls_active: bool = False,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.info = info
        self.handler = handler
        self.settings = settings
        self.conn = ServerConnection(settings.limits, tls_active=tls_active)
        self.spool: SpooledBody | None = None
        self.busy = False  # receiving or handing on a message
        self.stopping = False
        self._reading = False
        self._spool_failed = False
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        try:
            await self._converse()
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.debug("connection lost", client=self.info.client_ip, error=str(exc))
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._drop_spool()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    def request_stop(self) -> bool:
        """Ask the session to end; True if it can be interrupted right away."""
        self.stopping = True
        return self._reading and not self.busy

    async def _converse(self) -> None:
        refusal = await self.handler.on_connect(self.info)
        self.conn.greet(refusal or Reply.of(220, None, f"{self.info.hostname} ESMTP smtpgate"))
        await self._flush()
        while not self.conn.closing:
            if self.stopping and not self.busy:
                self.writer.write(self.conn.close_with(SHUTTING_DOWN))
                break
            data = await self._read()
            if not data:
                break
            self.conn.receive_data(data)
            await self._process()
            await self._flush()

    async def _read(self) -> bytes:
        body = self.conn.state in (State.DATA, State.BDAT)
        self._arm(self.settings.data_timeout if body else self.settings.command_timeout)
        self._reading = True
        try:
            return await self.reader.read(READ_SIZE)
        finally:
            self._reading = False
            self._deadline = None

    def _arm(self, timeout: float) -> None:
        """Set the read deadline; one timer per session, moved lazily.

        Re-arming on every read costs one clock read; the timer only fires
        (and reschedules itself) when a deadline might have passed.
        """
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # not reading: the next read re-arms
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._check_deadline)
            return
        log.info("timeout", client=self.info.client_ip, state=self.conn.state.value)
        self.writer.write(self.conn.close_with(TIMEOUT))
        self.writer.close()  # the pending read ends with EOF

    async def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)
            if self.writer.transport.get_write_buffer_size() > 65536:
                await self.writer.drain()

    async def _process(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if isinstance(event, ev.NeedData):
                return
            if isinstance(event, ev.MessageData):
                self._spool_write(event.data)
            elif isinstance(event, ev.MessageRejected):
                log.info("message refused", client=self.info.client_ip, reply=event.reply.text())
                self._end_message()
            elif isinstance(event, ev.AuthAborted):
                continue
            elif isinstance(event, ev.StartTls):
                await self._starttls()
                return
            else:
                conn.reply(await self._answer(event))

    async def _answer(self, event: ev.Event) -> Reply:
        if isinstance(event, ev.MessageComplete):
            return await self._message_complete()
        if (
            isinstance(event, ev.MailFrom)
            and self.settings.require_tls
            and not self.conn.tls_active
        ):
            return MUST_STARTTLS
        custom = await self.handler.on_command(self.info, event)
        reply = custom or self._default(event)
        if reply.code < 400:
            self._remember(event)
        return reply

    def _default(self, event: ev.Event) -> Reply:
        if isinstance(event, ev.Hello):
            offer = self.settings.tls_context is not None
            return self.conn.ehlo_reply(self.info.hostname, starttls=offer)
        if isinstance(event, ev.MailFrom):
            return Reply.of(250, "2.1.0", "Ok")
        if isinstance(event, ev.RcptTo):
            return Reply.of(250, "2.1.5", "Ok")
        if isinstance(event, ev.DataRequested):
            return r.START_INPUT if self._open_spool() else SPOOL_FAILED
        if isinstance(event, ev.Quit):
            return r.BYE
        if isinstance(event, ev.Verify):
            return r.VRFY_CANNOT
        if isinstance(event, ev.Help):
            return r.HELP
        if isinstance(event, (ev.AuthRequested, ev.AuthResponse)):
            return r.AUTH_UNAVAILABLE
        return r.OK  # RSET, NOOP

    def _remember(self, event: ev.Event) -> None:
        info = self.info
        if isinstance(event, ev.Hello):
            info.helo, info.esmtp = event.name, event.extended
            self._reset_transaction()
        elif isinstance(event, ev.MailFrom):
            info.sender, info.mail_event = event.sender, event
        elif isinstance(event, ev.RcptTo):
            info.recipients.append(Recipient(event.recipient, event.params))
        elif isinstance(event, ev.Reset):
            self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._drop_spool()
        self.info.sender, self.info.mail_event = None, None
        self.info.recipients = []
        self.busy = False

    # -- the body -------------------------------------------------------------

    def _open_spool(self) -> bool:
        if self.spool is not None:
            return True
        self.spool = SpooledBody(self.settings.spool_dir, new_queue_id())
        self.busy = True
        return True

    def _spool_write(self, data: bytes) -> None:
        if self.spool is None:
            self._open_spool()
        assert self.spool is not None
        try:
            if self.spool.size == 0:
                self.spool.write(self._trace_header(self.spool.queue_id))
            self.spool.write(data)
        except OSError as exc:  # the message is refused at its end, never half-kept
            log.error("spool write failed", queue_id=self.spool.queue_id, error=str(exc))
            self._spool_failed = True

    def _trace_header(self, queue_id: str) -> bytes:
        info = self.info
        facts = TraceFacts(
            helo=info.helo,
            client_ip=info.client_ip,
            client_name=None,
            by_host=info.hostname,
            esmtp=info.esmtp,
            tls=info.tls,
            authenticated=info.auth_user is not None,
            queue_id=queue_id,
            recipient=info.recipients[0].address if len(info.recipients) == 1 else None,
        )
        return received_header(facts, datetime.now(UTC))

    async def _message_complete(self) -> Reply:
        if self.spool is None or self.spool.size == 0:  # an empty body ("BDAT 0 LAST")
            self._spool_write(b"")
        spool = self.spool
        assert spool is not None
        try:
            spool.finish()
        except OSError as exc:
            log.error("spool write failed", queue_id=spool.queue_id, error=str(exc))
            self._spool_failed = True
        if self._spool_failed:
            self._end_message()
            return SPOOL_FAILED
        try:
            reply = await self.handler.on_message(self.info, self.info.envelope(), spool)
        finally:
            self._end_message()
        return reply

    def _end_message(self) -> None:
        self._drop_spool()
        self._spool_failed = False
        self.info.sender, self.info.mail_event = None, None
        self.info.recipients = []
        self.busy = False

    def _drop_spool(self) -> None:
        if self.spool is not None:
            self.spool.discard()
            self.spool = None

    # -- STARTTLS -------------------------------------------------------------

    async def _starttls(self) -> None:
        context = self.settings.tls_context
        assert context is not None  # the core only emits StartTls when offered
        self.conn.reply(r.READY_FOR_TLS)
        await self._flush()
        try:
            async with asyncio.timeout(self.settings.tls_handshake_timeout):
                await self.writer.start_tls(context)
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            log.info("TLS handshake failed", client=self.info.client_ip, error=str(exc))
            self.conn.close_with(TIMEOUT)  # nothing can be written in the clear now
            return
        self.conn.tls_started()
        self.info.tls = tls_summary(self.writer)
        self.info.helo, self.info.esmtp = "", False
        self._reset_transaction()


def tls_summary(writer: asyncio.StreamWriter) -> str | None:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)"`` for the Received header."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if not cipher:
        return str(ssl_object.version())
    return f"{ssl_object.version()} {cipher[0]} ({cipher[2]} bits)"
