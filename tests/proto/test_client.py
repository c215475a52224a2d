"""The sans-IO client core against the server core, in memory (no sockets).

* Any body, with or without PIPELINING and CHUNKING, cut at any write
  boundary, is delivered byte-exact or refused, never split in two.
* Each recipient gets its own RCPT reply or the final reply; MAIL refused
  gives everyone MAIL's reply; nobody accepted means RSET and no body.
* Replies are parsed strictly and bounded: a broken or endless reply is a
  ``ServerBroken`` event, never an exception or an unbounded buffer.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.errors import ProtocolUsageError
from smtpgate.model.envelope import MailParams, RcptParams, Recipient
from smtpgate.proto import events as ev
from smtpgate.proto.client import (
    Answer,
    ClientConnection,
    ClientLimits,
    NeedData,
    ServerBroken,
)
from smtpgate.proto.replies import Reply
from smtpgate.proto.transaction import Done, SendBody, Transaction
from tests.proto.helpers import Driver

REFUSED = Reply.of(550, "5.1.1", "no such user")


class HangupError(Exception):
    """The server core closed the conversation."""


class Pair:
    """A client core talking to a server core through a pipe cut into pieces."""

    def __init__(self, *, cut: int = 1 << 20, extensions: tuple[str, ...] = ()) -> None:
        self.server = Driver()  # it greeted already: "220 test ESMTP"
        self.client = ClientConnection()
        self.client.receive_data(Reply.of(220, None, "test ESMTP").to_bytes())
        self.cut = cut
        self.extensions = extensions
        self.commands: list[str] = []

    def answer(self) -> Answer:
        """Deliver the client's bytes, then the server's, until an answer."""
        while True:
            event = self.client.next_event()
            if isinstance(event, Answer):
                return event
            assert isinstance(event, NeedData), event
            out = self.client.data_to_send()
            self.commands += [
                line for line in out.split(b"\r\n") if line[:4].isupper() and line[:4].isalpha()
            ]
            reply = ""
            for i in range(0, len(out), self.cut):
                reply += self.server.feed(out[i : i + self.cut])
            if not reply:  # nothing to say and nothing said: the server hung up
                self.client.receive_eof()
                event = self.client.next_event()
                assert isinstance(event, ServerBroken), event
                raise HangupError
            reply_bytes = reply.encode()
            if self.commands and self.commands[-1].startswith(b"EHLO"):
                reply_bytes = self._with_extensions(reply_bytes)
            self.client.receive_data(reply_bytes)

    def _with_extensions(self, reply: bytes) -> bytes:
        lines = reply.split(b"\r\n")[:-1]
        keep = [
            line
            for line in lines[1:]
            if line[4:].split(b" ")[0].decode() not in ("PIPELINING", "CHUNKING")
            or line[4:].split(b" ")[0].decode() in self.extensions
        ]
        lines = [lines[0], *keep]
        out = [b"250-" + line[4:] for line in lines[:-1]] + [b"250 " + lines[-1][4:]]
        return b"\r\n".join(out) + b"\r\n"

    def hello(self) -> None:
        assert self.answer().reply.code == 220  # the greeting
        self.client.ehlo("client.example")
        assert self.answer().reply.code == 250

    def send(self, body: bytes, recipients: list[Recipient]) -> Done:
        flow = Transaction(self.client, "a@b.example", MailParams(), len(body), recipients)
        flow.begin()
        pieces = iter([body[i : i + 7] for i in range(0, len(body), 7)] or [b""])
        while True:
            step = flow.answer(self.answer())
            if isinstance(step, Done):
                return step
            if isinstance(step, SendBody) and step.kind == "DATA":
                for piece in pieces:
                    self.client.body(piece)
                self.client.end_body()
            elif isinstance(step, SendBody):
                self.client.bdat(body, last=True)


def _clean(body: bytes) -> bool:
    """What the server accepts: no NUL, no bare CR or LF."""
    rest = body.replace(b"\r\n", b"")
    return b"\x00" not in body and b"\r" not in rest and b"\n" not in rest


body_pieces = st.lists(
    st.sampled_from([b".", b"\r\n", b"a", b"..", b"\r\n.", b"x y", b"\r\n.\r\n", b"\n", b"\x00"]),
    max_size=40,
)
features = st.sampled_from([(), ("PIPELINING",), ("CHUNKING",), ("PIPELINING", "CHUNKING")])


@given(body_pieces, st.integers(min_value=1, max_value=9), features)
@settings(max_examples=300, deadline=None)
def test_any_body_arrives_byte_exact_or_is_refused_never_split(
    pieces: list[bytes], cut: int, extensions: tuple[str, ...]
) -> None:
    body = b"".join(pieces)
    pair = Pair(cut=cut, extensions=extensions)
    pair.hello()
    done = pair.send(body, [Recipient("c@d.example")])
    completes = [e for e in pair.server.events if isinstance(e, ev.MessageComplete)]
    assert len(completes) <= 1
    [reply] = done.replies
    if reply.code == 250:
        expected = (
            body
            if body.endswith(b"\r\n") or not body or "CHUNKING" in extensions
            else (body + b"\r\n")
        )
        assert pair.server.bodies == [expected]
    else:
        assert not _clean(body) or (not body.endswith(b"\r\n") and "CHUNKING" in extensions)
        assert pair.server.bodies == []


@pytest.mark.parametrize("extensions", [(), ("PIPELINING",), ("CHUNKING",)])
def test_each_recipient_gets_its_own_reply(extensions: tuple[str, ...]) -> None:
    pair = Pair(extensions=extensions)
    pair.server.overrides = {}
    refused = {"nobody@d.example"}
    original = pair.server.answer

    def answer(event: ev.Event) -> Reply:
        if isinstance(event, ev.RcptTo) and event.recipient in refused:
            return REFUSED
        return original(event)

    pair.server.answer = answer  # type: ignore[method-assign]
    pair.hello()
    recipients = [Recipient("c@d.example"), Recipient("nobody@d.example"), Recipient("e@d.example")]
    done = pair.send(b"Subject: x\r\n\r\nhi\r\n", recipients)
    assert [r.code for r in done.replies] == [250, 550, 250]
    assert pair.server.bodies == [b"Subject: x\r\n\r\nhi\r\n"]
    assert done.reusable


@pytest.mark.parametrize("extensions", [(), ("PIPELINING",)])
def test_nobody_accepted_means_rset_and_no_body(extensions: tuple[str, ...]) -> None:
    pair = Pair(extensions=extensions)
    pair.server.overrides = {ev.RcptTo: REFUSED}
    pair.hello()
    done = pair.send(b"hi\r\n", [Recipient("c@d.example"), Recipient("e@d.example")])
    assert [r.code for r in done.replies] == [550, 550]
    assert pair.server.bodies == []  # a pipelined DATA got 354 and an empty, refused body
    assert pair.commands[-1] == b"RSET"


def test_mail_refused_gives_every_recipient_its_reply() -> None:
    pair = Pair(extensions=("PIPELINING",))
    pair.server.overrides = {ev.MailFrom: Reply.of(553, "5.7.1", "sender refused")}
    pair.hello()
    done = pair.send(b"hi\r\n", [Recipient("c@d.example"), Recipient("e@d.example")])
    assert [r.text() for r in done.replies] == ["553 5.7.1 sender refused"] * 2


def test_dsn_parameters_pass_on_only_when_offered() -> None:
    pair = Pair()
    pair.hello()
    rcpt = Recipient("c@d.example", RcptParams(frozenset({"FAILURE"}), ("rfc822", "o@x.example")))
    flow = Transaction(pair.client, "a@b.example", MailParams(ret="HDRS", envid="e 1"), 4, [rcpt])
    flow.begin()
    sent = pair.client.data_to_send()
    assert sent == b"MAIL FROM:<a@b.example> SIZE=4 RET=HDRS ENVID=e+201\r\n"
    assert "DSN" in pair.client.extensions


def test_without_pipelining_a_second_command_before_the_reply_is_our_bug() -> None:
    client = ClientConnection()
    client.receive_data(b"220 hi\r\n")
    assert isinstance(client.next_event(), Answer)
    client.ehlo("c.example")
    with pytest.raises(ProtocolUsageError):
        client.command("MAIL", "MAIL FROM:<>")


def test_data_received_with_the_starttls_answer_is_discarded() -> None:
    """RFC 3207 §4.2: what came before the handshake, in the clear, is not trusted."""
    client = ClientConnection()
    client.receive_data(b"220 hi\r\n250 ok\r\n")
    client.next_event()
    client.ehlo("c")
    client.next_event()
    client.starttls()
    client.receive_data(b"220 2.0.0 go ahead\r\n250-injected\r\n250 PIPELINING\r\n")
    assert client.next_event() == Answer("STARTTLS", Reply.of(220, "2.0.0", "go ahead"))
    client.tls_started()
    assert client.extensions == {}
    assert isinstance(client.next_event(), NeedData)  # the injected reply is gone


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"hello there\r\n", "unintelligible reply"),
        (b"099 too low\r\n", "unintelligible reply"),
        (b"250-a\r\n251 b\r\n", "different codes"),
        (b"250-" + b"x" * 5000 + b"\r\n", "longer than 4096"),
        (b"250-" + b"x" * 5000, "longer than 4096"),  # no line end yet: never buffered on
        (b"250-x\r\n" * 200, "more than 100 lines"),
    ],
)
def test_a_broken_or_endless_reply_ends_the_connection(wire: bytes, reason: str) -> None:
    client = ClientConnection(ClientLimits())
    client.receive_data(wire)
    event = client.next_event()
    assert isinstance(event, ServerBroken)
    assert reason in event.reason


def test_eof_before_a_reply_is_reported() -> None:
    client = ClientConnection()
    client.receive_eof()
    assert client.next_event() == ServerBroken("the server closed the connection")
