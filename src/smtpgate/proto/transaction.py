"""One outbound mail transaction over a :class:`ClientConnection`, without I/O.

The driver calls :meth:`Transaction.begin`, then hands every :class:`Answer`
to :meth:`Transaction.answer`, which says what comes next: wait, send the body
(or its next BDAT chunk), or done with one reply per recipient. Rules kept here:

* MAIL, the RCPTs and (without CHUNKING) DATA go in one write when the
  server offers PIPELINING (RFC 2920); otherwise one at a time, and RCPT only
  after MAIL was accepted.
* Parameters are passed on only where the server offers the extension:
  SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), and RET,
  ENVID, NOTIFY, ORCPT (RFC 3461 §4) when it offers DSN.
* A recipient's outcome is its RCPT reply when refused, otherwise the final
  reply to the body (or the refusal of DATA); MAIL refused gives every
  recipient MAIL's reply. When no recipient was accepted the transaction is
  reset with RSET; a pipelined DATA that got 354 anyway is ended with an
  empty body first (RFC 2920 §3.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from smtpgate.model.envelope import MailParams, Recipient
from smtpgate.proto.client import Answer, ClientConnection
from smtpgate.proto.replies import Reply


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to send: read the next answer."""


@dataclass(frozen=True, slots=True)
class SendBody:
    """Send the body now: all of it after DATA's 354, or the next BDAT chunk."""

    kind: Literal["DATA", "BDAT"]


@dataclass(frozen=True, slots=True)
class Done:
    """Every recipient's reply, in the order given; ``reusable`` if the
    connection is back between transactions."""

    replies: list[Reply]
    reusable: bool = True


Step = Wait | SendBody | Done
WAIT = Wait()


def _xtext(text: str) -> str:
    """RFC 3461 §4: escape '+', '=' and anything outside printable ASCII."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode())
        for ch in text
    )


def mail_command(sender: str, params: MailParams, size: int, offered: dict[str, str]) -> str:
    words = [f"MAIL FROM:<{sender}>"]
    if "SIZE" in offered:
        words.append(f"SIZE={size}")
    if params.body == "8BITMIME" and "8BITMIME" in offered:
        words.append("BODY=8BITMIME")
    if params.smtputf8 and "SMTPUTF8" in offered:
        words.append("SMTPUTF8")
    if "DSN" in offered:
        if params.ret:
            words.append(f"RET={params.ret}")
        if params.envid:
            words.append(f"ENVID={_xtext(params.envid)}")
    return " ".join(words)


def rcpt_command(recipient: Recipient, offered: dict[str, str]) -> str:
    words = [f"RCPT TO:<{recipient.address}>"]
    params = recipient.params
    if "DSN" in offered:
        if params.notify is not None:
            order = ("SUCCESS", "FAILURE", "DELAY")
            words.append("NOTIFY=" + (",".join(n for n in order if n in params.notify) or "NEVER"))
        if params.orcpt:
            words.append(f"ORCPT={params.orcpt[0]};{_xtext(params.orcpt[1])}")
    return " ".join(words)


@dataclass
class Transaction:
    """MAIL, RCPT…, the body, and each recipient's reply (see the module's rules)."""

    conn: ClientConnection
    sender: str
    params: MailParams
    size: int
    recipients: Sequence[Recipient]
    mail: Reply | None = None
    rcpts: list[Reply] = field(default_factory=list)
    final: Reply | None = None
    _result: Done | None = None

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.conn.extensions

    @property
    def dsn_passed_on(self) -> bool:
        return "DSN" in self.conn.extensions

    def begin(self) -> None:
        offered = self.conn.extensions
        self.conn.command("MAIL", mail_command(self.sender, self.params, self.size, offered))
        if self.conn.pipelining:
            for recipient in self.recipients:
                self.conn.command("RCPT", rcpt_command(recipient, offered))
            if not self.chunking:
                self.conn.command("DATA", "DATA")

    def answer(self, answer: Answer) -> Step:
        reply, command = answer.reply, answer.command
        if command == "MAIL":
            self.mail = reply
        elif command == "RCPT":
            self.rcpts.append(reply)
        elif command == "DATA":
            return self._data(reply)
        elif command == "BDAT" and reply.code == 250:
            return SendBody("BDAT")
        elif command in ("END", "BDAT", "BDAT LAST"):
            return self._end(reply, reusable=command != "BDAT")
        elif command == "RSET":
            assert self._result is not None
            return self._result
        return self._after_envelope() if self.conn.awaiting == 0 else WAIT

    def _after_envelope(self) -> Step:
        """All pipelined replies are in (or the next RCPT is due)."""
        assert self.mail is not None
        if self.mail.code == 250 and len(self.rcpts) < len(self.recipients):
            recipient = self.recipients[len(self.rcpts)]
            self.conn.command("RCPT", rcpt_command(recipient, self.conn.extensions))
            return WAIT
        if not self._accepted():
            return self._reset()
        if self.chunking:
            return SendBody("BDAT")
        self.conn.command("DATA", "DATA")
        return WAIT

    def _data(self, reply: Reply) -> Step:
        if reply.code == 354 and not self._accepted():
            self._result = Done(self._replies(None))
            self.conn.end_body()  # a pipelined DATA with nobody to send to; RSET follows
            return WAIT
        if reply.code == 354:
            return SendBody("DATA")
        if not self._accepted():
            return self._reset()
        return self._end(reply, reusable=True)

    def _accepted(self) -> bool:
        assert self.mail is not None
        return self.mail.code == 250 and any(r.code in (250, 251) for r in self.rcpts)

    def _reset(self) -> Step:
        self._result = Done(self._replies(None))
        self.conn.command("RSET", "RSET")
        return WAIT

    def _end(self, final: Reply, *, reusable: bool) -> Step:
        if self._result is not None:  # the empty body's answer: now reset
            self.conn.command("RSET", "RSET")
            return WAIT
        self.final = final
        return Done(self._replies(final), reusable)

    def _replies(self, final: Reply | None) -> list[Reply]:
        assert self.mail is not None
        if self.mail.code != 250:
            return [self.mail] * len(self.recipients)
        return [
            final if final is not None and reply.code in (250, 251) else reply
            for reply in self.rcpts
        ]
