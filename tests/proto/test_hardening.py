"""Issue 10 findings against the core, driven with bytes: bounded input before
and after the greeting, fake ends of data acted on at once, ASCII-only
keywords, and the domainless ``<Postmaster>``."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.proto import events as ev
from smtpgate.proto import replies as r
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import POSTMASTER, ServerConnection
from smtpgate.proto.state import SessionLimits, State
from tests.proto.helpers import Driver, codes

MEGABYTE = b"EHLO flood.example\r\n" * 52_429

# -- item 22: bounded input ------------------------------------------------------


def test_bytes_before_the_greeting_are_never_kept() -> None:
    conn = ServerConnection()
    for _ in range(20):  # 20 MiB while the greeting hook waits
        conn.receive_data(MEGABYTE)
        assert conn.pending_input == 0
    assert conn.pregreet
    conn.greet(Reply.of(220, None, "gw.test ESMTP"))
    assert conn.data_to_send() == r.PREGREET.to_bytes()
    assert conn.closing


def test_a_refusal_greeting_after_pregreet_also_closes() -> None:
    conn = ServerConnection()
    conn.receive_data(b"EHLO early.example\r\n")
    conn.greet(Reply.of(554, "5.7.1", "Access denied"))
    assert conn.data_to_send() == b"554 5.7.1 Access denied\r\n"
    assert conn.closing


def test_input_while_a_reply_is_awaited_is_capped_then_closes_after_the_reply() -> None:
    limits = SessionLimits(max_pending_input=65_536)
    conn = ServerConnection(limits)
    conn.greet(Reply.of(220, None, "gw.test ESMTP"))
    conn.data_to_send()
    conn.receive_data(b"NOOP\r\n")
    assert isinstance(conn.next_event(), ev.Noop)  # the application is deciding...
    for _ in range(10):  # ...while 10 MiB arrive
        conn.receive_data(MEGABYTE)
        assert conn.pending_input <= 65_536
    conn.reply(r.OK)
    assert codes(conn.data_to_send().decode()) == ["250 2.0.0", "421 4.7.0"]
    assert conn.closing
    assert isinstance(conn.next_event(), ev.NeedData)


@pytest.mark.parametrize(
    "prefix",
    [
        b"",  # a command line without end
        b"EHLO c.example\r\nAUTH PLAIN\r\n",  # an AUTH response without end
        b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n",
        b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 99999999\r\n",
    ],
    ids=["command", "auth", "data", "bdat"],
)
def test_endless_input_without_a_line_end_stays_bounded(prefix: bytes) -> None:
    d = Driver(auth=("PLAIN",))
    for line in prefix.splitlines(keepends=True):
        d.feed(line)
    for _ in range(40):  # 10 MiB in 256 KiB reads
        d.feed(b"x" * 262_144)
        assert d.conn.pending_input <= 12_288 + 1
    assert not d.bodies


# -- item 27: a fake end of data closes at once --------------------------------

FAKE_ENDS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\n.\r"]


def _in_data() -> Driver:
    d = Driver()
    d.transaction()
    d.feed(b"DATA\r\n")
    return d


@pytest.mark.parametrize(
    "block",
    [
        b"Subject: x\r\n\r\nhi\r\n\n.\nMAIL FROM:<ceo@example.com>\r\n",  # the report's case
        b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<ceo@example.com>\r\n",
        b"Subject: x\r\n\r\nhi\r\n.\nMAIL FROM:<ceo@example.com>\r\n",
        b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<ceo@example.com>\r\n",
        b"Subject: x\r\n\r\nhi\r.\rMAIL FROM:<ceo@example.com>\r\n",
        b"hi\r\n\n.\n",
        b"\n.\nMAIL FROM:<a@b.example>\r\n",
    ],
)
def test_a_fake_end_inside_a_block_ending_in_crlf_closes_in_that_read(block: bytes) -> None:
    d = _in_data()
    out = d.feed(block)
    assert out == r.BARE_NEWLINE_DATA.text().replace(" / ", "") + "\r\n"
    assert d.conn.closing
    assert d.bodies == []


@given(
    head=st.lists(st.sampled_from([b"text", b"a b", b"..dot", b"x" * 50]), max_size=6),
    fake=st.sampled_from(FAKE_ENDS),
    tail=st.sampled_from([b"MAIL FROM:<ceo@example.com>\r\n", b"x\r\nRCPT TO:<v@e.example>\r\n"]),
    cuts=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8),
)
@settings(max_examples=300)
def test_the_close_comes_with_the_read_that_completes_the_fake_end(
    head: list[bytes], fake: bytes, tail: bytes, cuts: list[int]
) -> None:
    stream = b"".join(line + b"\r\n" for line in head) + b"smuggle" + fake + tail
    loose_end = re.search(rb"[\r\n]\.[\r\n]", stream)  # what a lenient server takes as the end
    assert loose_end is not None
    complete_at = loose_end.end()
    d = _in_data()
    position, i = 0, 0
    while position < len(stream):
        step = cuts[i % len(cuts)]
        i += 1
        d.feed(stream[position : position + step])
        position += step
        if position >= complete_at:
            break
        assert not d.conn.closing, f"closed at {position}, before the fake end at {complete_at}"
    assert d.conn.closing
    assert d.bodies == []
    assert not any(isinstance(e, ev.MailFrom) for e in d.events[3:])


def test_a_clean_body_is_not_affected() -> None:
    d = _in_data()
    out = d.feed(b"Subject: x\r\n\r\n..leading dot\r\nend\r\n")
    assert out == ""
    assert codes(d.feed(b".\r\n")) == ["250 2.0.0"]
    assert d.bodies == [b"Subject: x\r\n\r\n.leading dot\r\nend\r\n"]


# -- item 30(a): keywords are ASCII --------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("ma\u0131l FROM:<a@b.example>", "502 5.5.2"),  # dotless i: not MAIL
        ("MAIL FROM:<a@b.example> \u017fIZE=10", "501 5.5.4"),  # long s: not SIZE
        ("MAIL FROM:<a@b.example> SIZE=\u00b2", "501 5.5.4"),  # superscript two is no digit
        ("MAIL FROM:<a@b.example> SIZE=\u0661\u0662", "501 5.5.4"),  # nor Arabic-Indic digits
        ("MAIL FROM:<a@b.example> BODY=8b\u0131tm\u0131me", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> RET=FULL ENVID=x AUTH=<> \ufb00=1", "501 5.5.4"),
    ],
)
def test_non_ascii_lookalikes_are_not_keywords(line: str, expected: str) -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    out = d.feed(line.encode() + b"\r\n")
    assert codes(out) == [expected]
    assert not any(isinstance(e, ev.MailFrom) for e in d.events)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("RCPT TO:<c@d.example> NOTIFY=\u017fUCCESS", "501 5.5.4"),
        ("RCPT TO:<c@d.example> ORCPT=rfc8\u06622;c@d.example", "501 5.5.4"),
        ("RCPT TO:<c@d.example> NOT\u0130FY=NEVER", "501 5.5.4"),  # dotted capital I
    ],
)
def test_non_ascii_lookalikes_in_rcpt_parameters(line: str, expected: str) -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(d.feed(line.encode() + b"\r\n")) == [expected]
    assert not any(isinstance(e, ev.RcptTo) for e in d.events)


@pytest.mark.parametrize("line", ["BDAT \u00b2", "BDAT 1 la\u017ft", "BDAT \u0661"])
def test_bdat_with_non_ascii_size_or_last_is_a_syntax_error_not_a_crash(line: str) -> None:
    d = Driver()
    d.transaction()
    out = d.feed(line.encode() + b"\r\n")
    assert codes(out) == ["501 5.5.4"]
    assert d.conn.closing  # the chunk length is unknown: the octets cannot be skipped


def test_auth_mechanism_is_compared_in_ascii() -> None:
    d = Driver(auth=("PLAIN",))
    d.feed(b"EHLO c.example\r\n")
    assert codes(d.feed("AUTH PLA\u0131N\r\n".encode())) == ["504 5.5.4"]
    assert codes(d.feed(b"AUTH plain\r\n")) == ["334"]


def test_lower_case_ascii_still_works() -> None:
    d = Driver()
    d.feed(b"ehlo c.example\r\n")
    out = d.feed(b"mail from:<a@b.example> size=10 body=8bitmime\r\nrcpt to:<c@d.example>\r\n")
    assert codes(out) == ["250 2.0.0", "250 2.0.0"]


# -- item 30(b): <Postmaster> without a domain ----------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"RCPT TO:<postmaster>",
        b"RCPT TO:<Postmaster>",
        b"RCPT TO:<POSTMASTER>",
        b"rcpt to: <PostMaster> NOTIFY=NEVER",
    ],
)
def test_postmaster_without_a_domain_is_accepted(line: bytes) -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(d.feed(line + b"\r\n")) == ["250 2.0.0"]
    [rcpt] = [e for e in d.events if isinstance(e, ev.RcptTo)]
    assert rcpt.recipient == POSTMASTER


@pytest.mark.parametrize(
    "line", [b"RCPT TO:<postmasters>", b"RCPT TO:<postmaster>x", b"RCPT TO:<abuse>"]
)
def test_other_domainless_recipients_are_still_refused(line: bytes) -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(d.feed(line + b"\r\n")) == ["501 5.1.3"]
    assert d.conn.state is State.MAIL
