"""The server side of one SMTP connection, as a state machine with no I/O.

Use::

    conn = ServerConnection(limits)
    out = conn.greet(Reply.of(220, None, "mx.example ESMTP"))
    conn.receive_data(bytes_from_socket)
    while not isinstance(event := conn.next_event(), NeedData):
        ...decide...; conn.reply(verdict)      # for command events
    socket.write(conn.data_to_send())

Rules kept here:

* One event at a time: a command event must be answered with ``reply``
  before the next event is produced, so pipelined commands (RFC 2920) are
  answered in order and state changes follow the reply actually given.
* Only CRLF ends a command line (RFC 5321 §2.3.8). A bare CR or LF in a
  command gets 500 and the connection is closed, since the client's idea of
  where the line ends is unknowable; NUL and over-long lines (§4.5.3.1.4) get
  500 and the session goes on.
* Bytes received before the greeting (RFC 5321 §4.3.1: the client waits for
  it; Postfix postscreen's "pregreet" test), or after EHLO/HELO/DATA in the
  same pipelined group (RFC 2920 §3.1), are a violation: 554 and close, the
  way Postfix's ``smtpd_forbid_unauth_pipelining`` does. Bytes before the
  greeting are never kept: ``pregreet`` turns true and the greeting becomes
  the 554.
* Input is bounded. Whatever the core can read it consumes on
  ``next_event`` down to one incomplete line, and an incomplete line longer
  than its limit is dropped with an error. While a command awaits the
  application's reply nothing is consumed, so at most ``max_pending_input``
  octets are kept then; beyond that the input is dropped and, after the
  awaited reply, ``421 4.7.0`` closes the connection.
* ``RCPT TO:<Postmaster>`` without a domain is accepted in any case (RFC 5321
  §4.1.1.3, §4.5.1) and reaches the application as the recipient
  ``postmaster``, to be routed to the site's postmaster.
* Plaintext pipelined after STARTTLS is discarded (RFC 3207 §4.2,
  CVE-2011-0411); after the handshake the session starts afresh.
* After ``max_errors`` error replies without a delivered message the
  connection is closed with 421 (Postfix ``smtpd_hard_error_limit``).
* Replies the core decides (syntax, sequence, limits) never reach the
  application as events; everything else does.
"""

from __future__ import annotations

from collections.abc import Callable

from smtpgate.errors import ProtocolUsageError
from smtpgate.proto import replies as r
from smtpgate.proto.body import BodyChecker, ChunkFramer, DotFramer, Step
from smtpgate.proto.events import (
    AuthAborted,
    AuthRequested,
    AuthResponse,
    DataRequested,
    Event,
    Hello,
    Help,
    MailFrom,
    MessageComplete,
    MessageData,
    MessageRejected,
    NeedData,
    Noop,
    Quit,
    RcptTo,
    Reset,
    StartTls,
    Verify,
)
from smtpgate.proto.grammar import (
    SyntaxProblem,
    ascii_upper,
    parse_bdat,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
    split_command,
    split_params,
)
from smtpgate.proto.replies import Reply
from smtpgate.proto.state import (
    SessionFacts,
    SessionLimits,
    State,
    Transaction,
    b64,
    extensions,
    start_auth,
)

NEED_DATA = NeedData()


_NO_REPLY = (NeedData, MessageData, MessageRejected, AuthAborted)
_MUST_END_GROUP = frozenset({"EHLO", "HELO", "DATA"})
_FORBIDDEN = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "USER", "PASS"})
_UNIMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})


TOO_MUCH_INPUT = Reply.of(421, "4.7.0", "Error: too much input without waiting for replies")
POSTMASTER = "postmaster"  # the recipient of RCPT TO:<Postmaster> (RFC 5321 §4.1.1.3)


def _postmaster(text: str) -> tuple[str, str] | None:
    """``<Postmaster> params`` (any case, RFC 5321 §4.5.1) → (POSTMASTER, params)."""
    if ascii_upper(text[:12]) != "<POSTMASTER>" or text[12:13] not in ("", " "):
        return None
    return POSTMASTER, text[12:].strip(" ")


_observer: Callable[[Reply], None] | None = None


def observe_replies(observer: Callable[[Reply], None] | None) -> None:
    """Tell ``observer`` of every reply any server connection writes, the core's
    own included (the gateway counts them for its metrics); it must do no I/O."""
    global _observer  # noqa: PLW0603 - one process-wide hook, set once at start-up
    _observer = observer


class ServerConnection:
    """One SMTP server conversation; see the module docstring for its rules."""

    def __init__(self, limits: SessionLimits | None = None, *, tls_active: bool = False) -> None:
        self.limits = limits or SessionLimits()
        self.state = State.CONNECTED
        self.tls_active = tls_active
        self.errors = 0
        self._in = bytearray()
        self._out = bytearray()
        self._pending: Event | None = None
        self._session = SessionFacts()
        self._framer: DotFramer | ChunkFramer | None = None
        self._bdat_last = False
        self._held: Event | None = None
        self._state_before_body = State.GREETED
        self._state_before_auth = State.GREETED
        self._skip_line = False
        self._pregreet = False
        self._overflow = False

    # -- bytes in / bytes out ------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if not data or self.state is State.TLS_PENDING or self.state is State.CLOSED:
            return  # plaintext after STARTTLS, or after close, is dropped
        if self.state is State.CONNECTED:
            self._pregreet = True  # answered by the greeting; nothing is kept
            return
        if self._pending is not None and len(self._in) + len(data) > self._max_pending():
            self._overflow = True  # framing is lost: close after the awaited reply
            return
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closing(self) -> bool:
        return self.state is State.CLOSED

    @property
    def pregreet(self) -> bool:
        """The client sent bytes before the greeting (they were dropped)."""
        return self._pregreet

    @property
    def pending_input(self) -> int:
        """Octets received and not yet consumed."""
        return len(self._in)

    def _max_pending(self) -> int:
        lines = self.limits.max_command_line + self.limits.command_line_allowance
        longest = max(lines, self.limits.max_auth_line, self.limits.max_line_length)
        return max(self.limits.max_pending_input, 2 * longest)

    @property
    def authenticated(self) -> bool:
        return self._session.authenticated

    @property
    def helo_name(self) -> str:
        return self._session.helo_name

    # -- application calls -----------------------------------------------------

    def greet(self, reply: Reply) -> None:
        """Send the greeting; a 554 greeting refuses the session (RFC 5321 §3.1)."""
        self._expect_state(State.CONNECTED)
        if self._pregreet:
            self._write(r.PREGREET if reply.code == 220 else reply)
            self.state = State.CLOSED
            return
        self._write(reply)
        if reply.code == 220:
            self.state = State.READY
        elif reply.code == 554:
            self.state = State.REFUSED
        else:
            self.state = State.CLOSED

    def ehlo_reply(self, hostname: str, *, starttls: bool, auth: tuple[str, ...] = ()) -> Reply:
        """The 250 answer to the pending Hello, advertising what the session allows."""
        if not isinstance(self._pending, Hello):
            raise ProtocolUsageError("ehlo_reply without a pending EHLO/HELO")
        self._session.offer_starttls = starttls and not self.tls_active
        self._session.auth_mechanisms = auth
        if not self._pending.extended:
            return Reply.of(250, None, hostname)
        offered = extensions(self.limits, starttls=self._session.offer_starttls, auth=auth)
        return Reply(250, None, (hostname, *offered))

    def reply(self, reply: Reply) -> None:
        """Answer the pending command event; state follows the reply given."""
        event = self._pending
        if event is None:
            raise ProtocolUsageError("reply() without a pending event")
        self._pending = None
        self._write(reply)
        self._advance(event, reply)
        if reply.code >= 400:
            self._count_error()
        if reply.code == 421:
            self.state = State.CLOSED
        if self._overflow and self.state is not State.CLOSED:
            self._write(TOO_MUCH_INPUT)
            self.state = State.CLOSED

    def tls_started(self) -> None:
        """The handshake after STARTTLS succeeded: forget the plaintext session."""
        self._expect_state(State.TLS_PENDING)
        self.tls_active = True
        self._session = SessionFacts()
        self._in.clear()
        self.state = State.READY

    def close_with(self, reply: Reply) -> bytes:
        """End the session now (timeout, shutdown): the bytes to write last."""
        if self.state is not State.CLOSED:
            self._write(reply)
            self.state = State.CLOSED
        return self.data_to_send()

    # -- events --------------------------------------------------------------

    def next_event(self) -> Event:
        """The next event, or ``NeedData`` when more bytes are needed."""
        if self._pending is not None:
            raise ProtocolUsageError("reply to the previous event first")
        while True:
            event: Event | None
            if self._held is not None:
                event, self._held = self._held, None
            elif self.state in (State.DATA, State.BDAT):
                event = self._body_event()
            elif self.state in (State.CLOSED, State.CONNECTED, State.TLS_PENDING):
                return NEED_DATA
            else:
                line = self._take_line()
                if line is None:
                    return NEED_DATA
                event = self._line_event(line)
            if event is None:
                continue
            if not isinstance(event, _NO_REPLY):
                self._pending = event
            return event

    # -- command lines -------------------------------------------------------

    def _line_limit(self) -> int:
        if self.state is State.AUTH:
            return self.limits.max_auth_line
        return max(
            self.limits.max_command_line + self.limits.command_line_allowance,
            self.limits.max_auth_line,
        )

    def _take_line(self) -> bytes | None:
        """Take one LF-terminated line; refuse bare newlines and long lines."""
        while True:
            end = self._in.find(b"\n")
            if self._skip_line:
                if end < 0:
                    self._in.clear()
                    return None
                del self._in[: end + 1]
                self._skip_line = False
                continue
            if end < 0:
                if len(self._in) > self._line_limit():
                    self._in.clear()
                    self._skip_line = True
                    in_auth = self.state is State.AUTH
                    if in_auth:
                        self.state = self._state_before_auth  # the exchange is over
                    self._error(r.AUTH_LINE_TOO_LONG if in_auth else r.LINE_TOO_LONG)
                return None
            line = bytes(self._in[: end + 1])
            del self._in[: end + 1]
            if line[-2:-1] != b"\r" or b"\r" in line[:-2]:
                # Where the client thinks this line ends is unknowable: close.
                self._write(r.BARE_NEWLINE_COMMAND)
                self.state = State.CLOSED
            elif b"\x00" in line:
                self._error(r.NUL_IN_COMMAND)
            else:
                return line[:-2]
            if self.state is State.CLOSED:
                return None

    def _line_event(self, raw: bytes) -> Event | None:
        if self.state is State.AUTH:
            return self._auth_line(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(Reply.of(500, "5.5.2", "Error: invalid UTF-8 in command"))
            return None
        command = split_command(text)
        if len(raw) + 2 > self._limit_for(command.verb):
            self._error(r.LINE_TOO_LONG)
            return None
        if self.state is State.REFUSED:
            self._refused(command.verb)
            return None
        if command.verb in _MUST_END_GROUP and self._in:
            self._write(r.IMPROPER_PIPELINING)
            self.state = State.CLOSED
            return None
        try:
            return self._dispatch(command.verb, command.argument)
        except SyntaxProblem as problem:
            self._error(problem.reply)
            return None

    def _limit_for(self, verb: str) -> int:
        if verb in ("MAIL", "RCPT"):
            return self.limits.max_command_line + self.limits.command_line_allowance
        if verb == "AUTH":
            return self.limits.max_auth_line
        return self.limits.max_command_line

    def _refused(self, verb: str) -> None:
        if verb == "QUIT":
            self._write(r.BYE)
            self.state = State.CLOSED
            return
        self._error(r.BAD_SEQUENCE)
        return

    def _dispatch(self, verb: str, arg: str) -> Event | None:  # noqa: PLR0912 - one branch per verb
        if verb in ("EHLO", "HELO"):
            return self._hello(verb, arg)
        if verb == "MAIL":
            return self._mail(arg)
        if verb == "RCPT":
            return self._rcpt(arg)
        if verb == "DATA":
            return self._data(arg)
        if verb == "BDAT":
            return self._bdat(arg)
        if verb in ("RSET", "QUIT", "STARTTLS"):
            if arg:
                raise SyntaxProblem(Reply.of(501, "5.5.4", f"Syntax: {verb}"))
            if verb == "STARTTLS":
                return self._starttls()
            return Reset() if verb == "RSET" else Quit()
        if verb == "NOOP":
            return Noop()
        if verb == "VRFY":
            if not arg:
                raise SyntaxProblem(Reply.of(501, "5.5.4", "Syntax: VRFY address"))
            return Verify(arg)
        if verb == "HELP":
            return Help()
        if verb == "AUTH":
            return self._auth(arg)
        if verb in _FORBIDDEN:
            self._write(r.FORBIDDEN_COMMAND)
            self.state = State.CLOSED
            return None
        if verb in _UNIMPLEMENTED:
            self._error(r.NOT_IMPLEMENTED)
            return None
        self._error(r.UNRECOGNISED)
        return None

    def _hello(self, verb: str, arg: str) -> Event:
        if not arg or " " in arg or not arg.isascii() or not arg.isprintable():
            raise SyntaxProblem(Reply.of(501, "5.5.4", f"Syntax: {verb} hostname"))
        return Hello(extended=verb == "EHLO", name=arg)

    def _mail(self, arg: str) -> Event | None:
        if self.state is State.READY:
            self._error(r.NEED_HELO)
            return None
        if self.state is not State.GREETED:
            self._error(r.NESTED_MAIL)
            return None
        if ascii_upper(arg[:5]) != "FROM:":
            raise SyntaxProblem(Reply.of(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        rest = arg[5:].lstrip(" ")
        params = split_params(rest[rest.find(">") + 1 :] if ">" in rest else "")
        if params and not self._session.esmtp:
            raise SyntaxProblem(Reply.of(555, "5.5.4", "Error: parameters need EHLO"))
        mail_params = parse_mail_params(params)
        sender, _ = parse_path(rest, sender=True, smtputf8=mail_params.smtputf8)
        if mail_params.size is not None and mail_params.size > self.limits.max_message_size:
            self._error(r.SIZE_EXCEEDED_DECLARED)
            return None
        return MailFrom(sender, mail_params)

    def _rcpt(self, arg: str) -> Event | None:
        txn = self._session.txn
        if txn is None or self.state not in (State.MAIL, State.RCPT):
            self._error(r.NEED_MAIL)
            return None
        if ascii_upper(arg[:3]) != "TO:":
            raise SyntaxProblem(Reply.of(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        if txn.recipients >= self.limits.max_recipients:
            self._error(r.TOO_MANY_RECIPIENTS)
            return None
        text = arg[3:].lstrip(" ")
        path, rest = _postmaster(text) or parse_path(text, sender=False, smtputf8=txn.smtputf8)
        params = split_params(rest)
        if params and not self._session.esmtp:
            raise SyntaxProblem(Reply.of(555, "5.5.4", "Error: parameters need EHLO"))
        return RcptTo(path, parse_rcpt_params(params))

    def _data(self, arg: str) -> Event | None:
        if arg:
            raise SyntaxProblem(Reply.of(501, "5.5.4", "Syntax: DATA"))
        txn = self._session.txn
        if txn is None:
            self._error(r.NEED_MAIL)
            return None
        if txn.used_bdat:
            self._error(r.MIXED_DATA_BDAT)
            return None
        if txn.recipients == 0:
            self._error(r.NO_VALID_RECIPIENTS)
            return None
        return DataRequested()

    def _bdat(self, arg: str) -> Event | None:
        parsed = parse_bdat(arg)
        if parsed is None:
            # The chunk length is unknown, so its octets cannot be skipped.
            self._write(Reply.of(501, "5.5.4", "Syntax: BDAT size [LAST]"))
            self.state = State.CLOSED
            return None
        size, last = parsed
        txn = self._session.txn
        checker: BodyChecker | None = None
        if txn is not None and txn.recipients > 0:
            if txn.checker is None:
                txn.checker = BodyChecker(self.limits.body())
                txn.used_bdat = True
            checker = txn.checker
        self._framer = ChunkFramer(checker, size)
        self._bdat_last = last
        self._state_before_body = self.state
        self.state = State.BDAT
        return None

    def _starttls(self) -> Event | None:
        if self.tls_active:
            self._error(r.ALREADY_TLS)
            return None
        if not self._session.offer_starttls:
            self._error(r.STARTTLS_UNAVAILABLE)
            return None
        if self._in:
            self._in.clear()  # RFC 3207 §4.2: pipelined plaintext is discarded
        return StartTls()

    def _auth(self, arg: str) -> Event | None:
        started = start_auth(self._session, arg)
        if isinstance(started, Reply):
            self._error(started)
            return None
        self._state_before_auth = self.state
        return started

    def _auth_line(self, raw: bytes) -> Event | None:
        self.state = self._state_before_auth
        if raw == b"*":
            self._error(r.AUTH_CANCELLED)
            return AuthAborted()
        decoded = b64(raw.decode("ascii", "replace"))
        if decoded is None:
            self._error(r.AUTH_BAD_BASE64)
            return None
        self.state = State.AUTH
        return AuthResponse(decoded)

    # -- bodies --------------------------------------------------------------

    def _body_event(self) -> Event | None:
        framer = self._framer
        assert framer is not None
        step = framer.take(self._in)
        after = self._complete_body(framer, step) if step.finished else None
        if step.data:
            self._held = after
            return MessageData(step.data)
        if not step.finished:
            return NEED_DATA
        return after

    def _complete_body(self, framer: DotFramer | ChunkFramer, step: Step) -> Event | None:
        """The body (or a chunk) ended: answer problems, or ask for a verdict."""
        self._framer = None
        checker = framer.checker
        if checker is None:  # BDAT outside a transaction: octets skipped, refuse
            self.state = self._state_before_body
            self._error(r.NEED_RCPT if self._session.txn else r.NEED_MAIL)
            return None
        if isinstance(framer, DotFramer) and step.must_close:
            self._write(r.BARE_NEWLINE_DATA)
            self._end_transaction()
            self.state = State.CLOSED
            return MessageRejected(r.BARE_NEWLINE_DATA)
        last = isinstance(framer, DotFramer) or self._bdat_last
        if last:
            checker.finish()
        if checker.bare_newline:
            return self._reject_body(r.BARE_NEWLINE_CHUNK)
        if checker.problem is not None:
            return self._reject_body(checker.problem)
        self.state = State.RCPT
        if not last:
            self._write(Reply.of(250, "2.0.0", f"Ok: {checker.size} octets received"))
            return None
        return MessageComplete(checker.size)

    def _reject_body(self, reply: Reply) -> Event:
        self._end_transaction()
        self._error(reply)
        return MessageRejected(reply)

    # -- state changes -------------------------------------------------------

    def _advance(self, event: Event, reply: Reply) -> None:
        ok = reply.code < 400
        session = self._session
        if isinstance(event, Hello) and ok:
            session.esmtp = event.extended
            session.helo_name = event.name
            session.txn = None
            self.state = State.GREETED
        elif isinstance(event, MailFrom) and ok:
            session.txn = Transaction(smtputf8=event.params.smtputf8)
            self.state = State.MAIL
        elif isinstance(event, RcptTo) and ok and session.txn is not None:
            session.txn.recipients += 1
            self.state = State.RCPT
        elif isinstance(event, DataRequested) and reply.code == 354:
            self._framer = DotFramer(BodyChecker(self.limits.body()))
            self.state = State.DATA
        elif isinstance(event, MessageComplete):
            self._end_transaction()
            if ok:
                self.errors = 0
        elif isinstance(event, Reset) and ok:
            self._end_transaction()
        elif isinstance(event, Quit):
            self.state = State.CLOSED
        elif isinstance(event, StartTls) and reply.code == 220:
            self._in.clear()
            self.state = State.TLS_PENDING
        elif isinstance(event, (AuthRequested, AuthResponse)):
            self._advance_auth(reply)

    def _advance_auth(self, reply: Reply) -> None:
        if reply.code == 334:
            self.state = State.AUTH
            return
        self.state = self._state_before_auth
        if reply.code == 235:
            self._session.authenticated = True

    def _end_transaction(self) -> None:
        self._session.txn = None
        self._framer = None
        if self.state is not State.CLOSED:
            self.state = State.GREETED if self._session.helo_name else State.READY

    def _write(self, reply: Reply) -> None:
        self._out += reply.to_bytes()
        if _observer is not None:
            _observer(reply)

    def _error(self, reply: Reply) -> None:
        self._write(reply)
        self._count_error()

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors >= self.limits.max_errors and self.state is not State.CLOSED:
            self._write(r.TOO_MANY_ERRORS)
            self.state = State.CLOSED

    def _expect_state(self, state: State) -> None:
        if self.state is not state:
            raise ProtocolUsageError(f"expected state {state.value}, in {self.state.value}")
