"""One inbound SMTP session: transport ↔ protocol core ↔ handler.

The session is an ``asyncio.Protocol``: bytes from ``data_received`` go
straight into the sans-IO core and the replies of a pipelined group go out in
one write, with no coroutine per read. Only real waits run as a task (the
greeting hook, the end-of-message hand-off, the STARTTLS handshake); while one
runs, reading is paused, so pipelined input waits its turn. This is the one
place that writes to the socket (the chasquid shape). It decides nothing
about relay or delivery: the :class:`SessionHandler` does.

Rules kept here:

* Before the greeting reading stays on only to notice a client that talks
  first (RFC 5321 §4.3.1): its bytes are dropped, reading pauses at once (so
  the kernel's buffers fill and the client's writes block, however long
  the greeting hook waits on DNS), and the greeting becomes ``554 5.5.0``.
* Deadlines that trickling cannot extend (RFC 5321 §4.5.3.2; Postfix
  ``smtpd_per_record_deadline``): a command line must be complete within
  ``command`` seconds of the server starting to wait for it, and bytes that
  do not complete a command move nothing. A body (DATA, or one BDAT chunk)
  starts with ``data`` seconds; each read of N octets adds N /
  ``min_data_rate`` seconds (Postfix ``smtpd_min_data_rate``), but never
  more than ``data`` seconds from now. So a body of S octets must arrive
  within ``data + S / min_data_rate`` seconds, and a sender at least that
  fast is never cut. On expiry ``421 4.4.2`` and close. One timer per
  session, moved lazily.
* What the listener demands before MAIL (``require-starttls``: STARTTLS
  first, RFC 3207 §4; a client certificate) is not decided here: the
  session hands the listener's settings to the handler as facts
  (``SessionInfo.tls_required``, ``client_certificate_required``), and the
  gateway's policy refuses MAIL with ``530 5.7.0`` (``policy.session``), so
  ``policy explain`` replays the very same step.
* Bodies stream into a :class:`~smtpgate.spool.SpooledBody`.
* On shutdown an idle session gets ``421 4.3.2`` at once; a session inside a
  message body or hand-off finishes it first.
* A client that disconnects during the hand-off cancels it: it was not told
  250, so it will send again, and the next hop discards an unfinished DATA.
* A failed or timed-out STARTTLS handshake is logged once (``TLS handshake
  failed``, with the client and the phase), however the event loop ends it.
* ``RCPT TO:<Postmaster>`` (RFC 5321 §4.5.1) reaches the handler as the bare
  recipient ``postmaster`` and enters the envelope as ``info.postmaster``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from smtpgate.inbound import sasl
from smtpgate.inbound.contract import Pending, SessionHandler, SessionInfo, SessionSettings
from smtpgate.inbound.peer import client_certificate, is_loopback, tls_summary
from smtpgate.inbound.proxy import ProxyHeaderError, parse_proxy_header
from smtpgate.inbound.sasl import SaslExchange, SaslStep
from smtpgate.inbound.trace import TraceFacts, received_header
from smtpgate.model.envelope import MailParams, Recipient
from smtpgate.observe import events
from smtpgate.observe.log import get_logger
from smtpgate.proto import events as ev
from smtpgate.proto import replies as r
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import POSTMASTER, TOO_MUCH_INPUT, ServerConnection
from smtpgate.proto.state import State
from smtpgate.spool import SpooledBody, new_queue_id

log = get_logger("smtpgate.session")
LINGER = 1.0  # seconds a closing connection drops what the client still sends

TIMEOUT = Reply.of(421, "4.4.2", "Error: timeout exceeded")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Service shutting down, try again later")
SPOOL_FAILED = Reply.of(451, "4.3.0", "Error: queue file write error")
HAND_OFF_FAILED = Reply.of(451, "4.3.0", "Error: local error in processing")


class SessionHost(Protocol):
    """The listener side a session reports to (connection limits, shutdown)."""

    hostname: str

    def admit(self, session: Session) -> Reply | None: ...

    def forget(self, session: Session) -> None: ...

    def new_handler(self) -> SessionHandler: ...


class Session(asyncio.Protocol):
    """Drives one connection from greeting to close."""

    def __init__(
        self,
        host: SessionHost,
        listener: str,
        settings: SessionSettings,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.host = host
        self.listener = listener
        self.settings = settings
        self.handler = host.new_handler()
        self.conn = ServerConnection(settings.limits)
        self.transport: asyncio.Transport | None = None
        self.info = SessionInfo(
            listener,
            "?",
            0,
            host.hostname,
            tls_required=settings.require_tls,
            client_certificate_required=settings.client_certificate_required,
        )
        self.spool: SpooledBody | None = None
        self.stopping = False
        self._loop = loop or asyncio.get_running_loop()  # the listener's, looked up once
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._task: asyncio.Task[None] | None = None
        self._proxy_buffer: bytearray | None = bytearray() if settings.proxy_protocol else None
        self._admitted = False
        self._spool_failed = False
        self._write_paused = False
        self._reading_paused = False
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_body = False  # the phase the deadline was set for
        self._received = 0  # octets since the last pump (body credit)
        self._tls_early: bytearray | None = None
        self._tls_overflow = False
        self._handshaking = False
        self._pregreet_noted = False
        self._lingering = False  # the last reply is sent; reading only to drop
        self._sasl: SaslExchange | None = None

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.info.client_ip, self.info.client_port = str(peer[0]), int(peer[1])
        self.info.tls = tls_summary(transport)
        self.conn.tls_active = self.info.tls is not None
        self._note_client_certificate()
        self.info.offer_starttls = self.settings.tls_context is not None
        if self._proxy_buffer is not None:
            self._set_deadline(self._now() + self.settings.proxy_timeout)
            return
        self._admit()

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # the last reply is out; what comes now is dropped
            return
        if self._proxy_buffer is not None:
            self._proxy_data(data)
            return
        if self._tls_early is not None:
            self._early_tls_data(data)
            return
        self._received += len(data)
        self.conn.receive_data(data)
        if self.conn.state is State.CONNECTED:
            self._note_pregreet()
        elif self._task is None:
            self._pump()

    def _early_tls_data(self, data: bytes) -> None:
        """Decrypted bytes that beat our coroutine's resumption after the
        handshake; plaintext can no longer arrive (reading was paused at
        STARTTLS and the core discarded what came with it). Bounded too."""
        early = self._tls_early
        assert early is not None
        if len(early) + len(data) > self.settings.limits.max_pending_input:
            self._tls_overflow = True
            return
        early += data

    def eof_received(self) -> bool | None:
        return False  # the client is gone: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshaking:  # uvloop ends a timed-out handshake here, not in start_tls
            self._handshake_failed(exc)
        if self._task is not None:
            self._task.cancel()
        self._release()

    def _release(self) -> None:
        """The connection is over: free its slot and its spool file, once."""
        if self.done.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._drop_spool()
        if self._admitted:
            self.host.forget(self)
        self.done.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # -- life cycle ----------------------------------------------------------------

    def _admit(self) -> None:
        refusal = self.host.admit(self)  # the host logs refusals (summarised)
        if refusal is not None:
            self._write_and_close(refusal.to_bytes())
            return
        self._admitted = True
        if self.conn.pregreet:  # behind a PROXY header, in the same read
            self._note_pregreet()
        answer = self.handler.on_connect(self.info)
        if isinstance(answer, Pending):
            self._spawn(self._greet_later(answer))
            return
        self._greet(answer)  # the common case, a pure decision: no task, no pause
        self._pump()

    def _note_pregreet(self) -> None:
        """The client talked before the greeting: stop reading, say so once."""
        if not self.conn.pregreet or self._pregreet_noted:
            return
        self._pregreet_noted = True
        self._update_reading()
        log.info("pregreet", client=self.info.client_ip, listener=self.listener)

    def _proxy_data(self, data: bytes) -> None:
        buffer = self._proxy_buffer
        assert buffer is not None
        buffer += data
        try:
            parsed = parse_proxy_header(bytes(buffer))
        except ProxyHeaderError:
            self._close()
            return
        if parsed is None:
            return
        self._proxy_buffer = None
        self._deadline = None
        if parsed.client is not None:
            self.info.client_ip, self.info.client_port = parsed.client
        rest = bytes(buffer[parsed.header_length :])
        if rest:
            self.conn.receive_data(rest)  # before the greeting: a violation the core reports
        self._admit()

    async def _greet_later(self, pending: Pending) -> None:
        self._greet(await pending.answer)

    def _greet(self, refusal: Reply | None) -> None:
        greeting = Reply.of(220, None, f"{self.info.hostname} {self.settings.banner}")
        self.conn.greet(refusal or greeting)

    def request_stop(self) -> None:
        """Shut down: at once when idle, after the current message otherwise."""
        self.stopping = True
        if self._idle():
            self._write_and_close(self.conn.close_with(SHUTTING_DOWN))

    def _idle(self) -> bool:
        return self._task is None and self.conn.state not in (State.DATA, State.BDAT)

    # -- the pump ------------------------------------------------------------------

    def _pump(self) -> None:
        """Turn buffered input into replies until more input or a wait is needed."""
        conn = self.conn
        while self._task is None:
            event = conn.next_event()
            kind = type(event)
            if kind is ev.NeedData:
                break
            if kind is ev.MessageData:
                self._spool_write(event.data)  # type: ignore[union-attr]
            elif kind is ev.MessageComplete:
                self._spawn(self._message_complete())
            elif kind is ev.StartTls:
                self._spawn(self._starttls())
            elif kind is ev.AuthRequested or kind is ev.AuthResponse:
                self._auth_step(event)  # type: ignore[arg-type]
            elif kind is ev.MessageRejected:
                log.info("message refused", client=self.info.client_ip, reply=event.reply.text())  # type: ignore[union-attr]
                self._note_refused(event.reply)  # type: ignore[union-attr]
                self._end_message()
            elif kind is not ev.AuthAborted:
                answer = self._answer(event)
                if isinstance(answer, Pending):
                    self._spawn(self._answer_later(event, answer))
                else:
                    conn.reply(answer)
        self._after_pump()

    def _note_refused(self, reply: Reply) -> None:
        """The core refused the message (size, line length, ...): a mail event."""
        info = self.info
        who = events.Client(
            info.client_ip, "unknown", info.listener, info.profile, info.helo, info.esmtp, info.tls
        )
        rcpt = info.recipients[0].address if info.recipients else None
        why = "refused by the protocol core"
        refusal = events.Refused(
            "DATA", who, reply.code, reply.status, reply.text(), why, info.sender, rcpt,
            self.spool.queue_id if self.spool is not None else "",
        )  # fmt: skip
        events.publish(refusal)

    def _after_pump(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        out = self.conn.data_to_send()
        if self._task is not None:
            if out:
                transport.write(out)
            return
        if self.conn.closing:
            self._write_and_close(out)
        elif self.stopping and self._idle():
            self._write_and_close(out + self.conn.close_with(SHUTTING_DOWN))
        else:
            if out:
                transport.write(out)
            self._wait_for_client(replied=bool(out))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._deadline = None
        self._task = self._loop.create_task(work)
        self._task.add_done_callback(self._task_done)
        self._update_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("session task failed", client=self.info.client_ip, error=repr(error))
            self._write_and_close(self.conn.close_with(HAND_OFF_FAILED))
            return
        self._update_reading()
        self._pump()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        # The greeting hook alone leaves reading on, to notice a client that
        # talks first; once it has, reading stops too.
        greeting = self.conn.state is State.CONNECTED and not self.conn.pregreet
        pause = (self._task is not None and not greeting) or self._write_paused
        if pause and not self._reading_paused:
            transport.pause_reading()
        elif not pause and self._reading_paused:
            transport.resume_reading()
        self._reading_paused = pause

    def _write_and_close(self, out: bytes) -> None:
        """Send the last reply and end the connection with a lingering close: our
        side is shut down (FIN after the reply) and whatever the client still
        sends is read and dropped for ``LINGER`` seconds. Closing with its bytes
        unread would make the kernel reset the connection, and a client can lose
        the reply it was about to read (a 421 at a deadline, say)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        if out:
            transport.write(out)
        if not transport.can_write_eof():  # TLS: close_notify, then close
            transport.close()
            return
        self._lingering = True
        try:
            transport.write_eof()
        except OSError:  # the client is gone already
            transport.close()
            return
        if self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False
        self._loop.call_later(LINGER, transport.close)
        self._release()  # the session is over: its slot, its spool, a stop need not wait

    def _close(self) -> None:
        self._write_and_close(b"")

    # -- timeouts --------------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time()

    def _wait_for_client(self, *, replied: bool) -> None:
        """Set the deadline for the client's next step (see the module docstring):
        fresh after a reply or a change of phase; in a body, extended by the
        octets received at ``min_data_rate``; otherwise left where it is."""
        settings, now = self.settings, self._now()
        body = self.conn.state in (State.DATA, State.BDAT)
        received, self._received = self._received, 0
        if replied or body != self._in_body or self._deadline is None:
            self._in_body = body
            phase = settings.data_timeout if body else settings.command_timeout
            self._set_deadline(now + phase)
        elif body and received and settings.limits.min_data_rate:
            credit = received / settings.limits.min_data_rate
            self._set_deadline(min(now + settings.data_timeout, self._deadline + credit))

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        timer = self._timer
        if timer is not None and timer.when() <= deadline:
            return  # _check_deadline moves it on when it fires
        if timer is not None:
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # busy, not waiting for the client: the next wait re-arms
        loop = self._loop
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._check_deadline)
            return
        log.info(
            "timeout",
            client=self.info.client_ip,
            state=self.conn.state.value,
            pending=self.conn.pending_input,
        )
        if self._proxy_buffer is not None:
            self._close()
        else:
            self._write_and_close(self.conn.close_with(TIMEOUT))

    # -- commands --------------------------------------------------------------------

    def _answer(self, event: ev.Event) -> Reply | Pending:
        decided = self.handler.on_command(self.info, event)
        if isinstance(decided, Pending):
            return decided
        reply = decided or self._default(event)
        if reply.code < 400:
            self._remember(event)
        return reply

    async def _answer_later(self, event: ev.Event, pending: Pending) -> None:
        """The answer of a command that needed I/O; the pump resumes after it."""
        reply = await pending.answer or self._default(event)
        if reply.code < 400:
            self._remember(event)
        self.conn.reply(reply)

    def _default(self, event: ev.Event) -> Reply:
        kind = type(event)
        if kind is ev.Hello:
            info = self.info
            offer = info.offer_starttls and self.settings.tls_context is not None
            auth_now = self.conn.tls_active or self._plaintext_auth_allowed()
            auth = info.auth_mechanisms if auth_now and not info.auth_user else ()
            return self.conn.ehlo_reply(info.hostname, starttls=offer, auth=auth)
        if kind is ev.MailFrom:
            return r.SENDER_OK
        if kind is ev.RcptTo:
            return r.RECIPIENT_OK
        if kind is ev.DataRequested:
            return r.START_INPUT
        if kind is ev.Quit:
            return r.BYE
        if kind is ev.Verify:
            return r.VRFY_CANNOT
        if kind is ev.Help:
            return r.HELP
        return r.OK  # RSET, NOOP

    def _remember(self, event: ev.Event) -> None:
        info = self.info
        if isinstance(event, ev.RcptTo):
            info.recipients.append(Recipient(self._address(event.recipient), event.params))
        elif isinstance(event, ev.MailFrom):
            info.sender, info.mail_params = event.sender, event.params
        elif isinstance(event, ev.Hello):
            info.helo, info.esmtp = event.name, event.extended
            self._end_message()
        elif isinstance(event, ev.Reset):
            self._end_message()

    def _address(self, recipient: str) -> str:
        """The envelope address: ``<Postmaster>`` goes to the handler's postmaster."""
        if recipient != POSTMASTER:
            return recipient
        return self.info.postmaster or f"postmaster@{self.info.hostname}"

    def _note_client_certificate(self) -> None:
        """Record the verified client certificate (the handshake checked the chain)."""
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return
        settings = self.settings
        found = client_certificate(der, settings.client_certificate_pin, settings.client_spki_pin)
        if isinstance(found, str):
            log.info("client certificate refused", client=self.info.client_ip, sha256=found)
            return
        subject, self.info.client_certificate = found
        if self.info.tls and "client verified" not in self.info.tls:
            self.info.tls += f", client verified: {subject}"
        log.info(
            "client certificate",
            client=self.info.client_ip,
            certificate=self.info.client_certificate,
        )

    # -- SMTP AUTH -------------------------------------------------------------------

    def _plaintext_auth_allowed(self) -> bool:
        """AUTH without TLS: only for loopback clients of a listener that says so."""
        return self.settings.plaintext_auth_on_loopback and is_loopback(self.info.client_ip)

    def _auth_step(self, event: ev.AuthRequested | ev.AuthResponse) -> None:
        if isinstance(event, ev.AuthRequested):
            self._sasl = SaslExchange(event.mechanism)
            step = self._sasl.start(event.initial_response)
        elif self._sasl is not None:
            step = self._sasl.respond(event.data)
        else:  # pragma: no cover - the core only sends responses inside an exchange
            step = SaslStep(failure=sasl.MALFORMED)
        if step.challenge is not None:
            self.conn.reply(Reply(334, None, (base64.b64encode(step.challenge).decode(),)))
        elif step.failure is not None:
            self._sasl = None
            self.conn.reply(step.failure)
        else:
            self._sasl = None
            assert step.username is not None
            assert step.password is not None
            self._spawn(self._verify(step.username, step.password))

    async def _verify(self, username: str, password: str) -> None:
        reply = await self.handler.on_auth(self.info, username, password)
        if reply.code == 235:
            self.info.auth_user = username
        self.conn.reply(reply)

    # -- the body --------------------------------------------------------------------

    def _spool_write(self, data: bytes) -> None:
        if self.spool is None:
            self.spool = SpooledBody(self.settings.spool_dir, new_queue_id())
            data = self._trace_header(self.spool.queue_id) + data
        try:
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

    async def _message_complete(self) -> None:
        if self.spool is None:  # an empty body ("BDAT 0 LAST")
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
            self.conn.reply(SPOOL_FAILED)
            return
        try:
            reply = await self.handler.on_message(self.info, self.info.envelope(), spool)
        finally:
            self._end_message()
        self.conn.reply(reply)

    def _end_message(self) -> None:
        self._drop_spool()
        self._spool_failed = False
        info = self.info
        info.sender, info.mail_params, info.recipients = None, MailParams(), []

    def _drop_spool(self) -> None:
        if self.spool is not None:
            self.spool.discard()
            self.spool = None

    # -- STARTTLS --------------------------------------------------------------------

    async def _starttls(self) -> None:
        context = self.settings.tls_context
        transport = self.transport
        assert context is not None  # the core only emits StartTls when offered
        assert transport is not None
        self.conn.reply(r.READY_FOR_TLS)
        transport.write(self.conn.data_to_send())
        loop = asyncio.get_running_loop()
        self._tls_early = bytearray()
        self._handshaking = True
        try:
            secure = await loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.settings.tls_handshake_timeout,
            )
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as exc:
            self._tls_early = None
            self._handshake_failed(exc)
            self.conn.close_with(TIMEOUT)  # nothing more can be said in the clear
            transport.abort()
            self._release()  # asyncio does not call connection_lost for it
            return
        self._handshaking = False
        self.transport = cast(asyncio.Transport, secure)
        self._reading_paused = False
        self.conn.tls_started()
        self.info.tls = tls_summary(self.transport)
        self._note_client_certificate()
        self.info.helo, self.info.esmtp = "", False
        self._end_message()
        early, self._tls_early = bytes(self._tls_early), None
        if self._tls_overflow:
            self.conn.close_with(TOO_MUCH_INPUT)
        elif early:
            self.conn.receive_data(early)

    def _handshake_failed(self, exc: BaseException | None) -> None:
        if not self._handshaking:
            return
        self._handshaking = False
        error = str(exc) if exc is not None and str(exc) else "connection closed"
        log.info("TLS handshake failed", client=self.info.client_ip, phase="STARTTLS", error=error)


async def wait_closed(sessions: list[Session], timeout: float) -> list[Session]:
    """Wait for sessions to end; returns those still open after ``timeout``."""
    if not sessions:
        return []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(s.done for s in sessions))
    return [s for s in sessions if not s.done.done()]
