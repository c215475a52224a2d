"""The server core driven with byte strings: no sockets, no event loop."""

from __future__ import annotations

import pytest

from smtpgate.errors import ProtocolUsageError
from smtpgate.proto import events as ev
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import ServerConnection
from smtpgate.proto.state import SessionLimits, State
from tests.proto.helpers import Driver, codes


def test_ehlo_advertises_the_extensions_of_the_issue() -> None:
    d = Driver(starttls=True, auth=("PLAIN", "LOGIN"))
    out = d.feed(b"EHLO client.example\r\n")
    for keyword in (
        "PIPELINING",
        "SIZE 10240000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
        "STARTTLS",
        "AUTH PLAIN LOGIN",
    ):
        assert f"250-{keyword}\r\n" in out or f"250 {keyword}\r\n" in out


def test_ehlo_reply_omits_starttls_and_auth_unless_allowed() -> None:
    out = Driver().feed(b"EHLO client.example\r\n")
    assert "STARTTLS" not in out
    assert "AUTH" not in out


def test_helo_gets_a_single_line() -> None:
    assert Driver().feed(b"HELO client.example\r\n") == "250 test\r\n"


def test_a_whole_transaction_with_pipelining_is_answered_in_order() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    out = d.feed(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@d.example>\r\nDATA\r\n"
    )
    assert codes(out) == ["250 2.0.0", "250 2.0.0", "250 2.0.0", "354"]
    out = d.feed(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert codes(out) == ["250 2.0.0", "221 2.0.0"]
    assert d.bodies == [b"Subject: x\r\n\r\nhello\r\n"]
    assert d.conn.closing


def test_mail_before_ehlo_is_a_sequence_error() -> None:
    assert codes(Driver().feed(b"MAIL FROM:<a@b.example>\r\n")) == ["503 5.5.1"]


def test_nested_mail_is_refused() -> None:
    d = Driver()
    d.transaction()
    assert codes(d.feed(b"MAIL FROM:<a@b.example>\r\n")) == ["503 5.5.1"]


def test_rcpt_without_mail_and_data_without_rcpt_are_refused() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    assert codes(d.feed(b"RCPT TO:<c@d.example>\r\n")) == ["503 5.5.1"]
    assert codes(d.feed(b"DATA\r\n")) == ["503 5.5.1"]
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(d.feed(b"DATA\r\n")) == ["554 5.5.1"]


def test_refused_recipient_does_not_count_towards_data() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    d.overrides[ev.RcptTo] = Reply.of(550, "5.1.1", "no such user")
    d.feed(b"RCPT TO:<c@d.example>\r\n")
    assert codes(d.feed(b"DATA\r\n")) == ["554 5.5.1"]


def test_unknown_and_unimplemented_commands() -> None:
    d = Driver()
    assert codes(d.feed(b"FROB\r\n")) == ["502 5.5.2"]
    assert codes(d.feed(b"EXPN staff\r\n")) == ["502 5.5.1"]


def test_vrfy_help_noop_rset_reach_the_application() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"VRFY root\r\n")
    d.feed(b"HELP\r\n")
    d.feed(b"NOOP\r\n")
    d.feed(b"RSET\r\n")
    kinds = [type(e) for e in d.events]
    assert kinds == [ev.Hello, ev.Verify, ev.Help, ev.Noop, ev.Reset]


def test_rset_drops_the_transaction() -> None:
    d = Driver()
    d.transaction()
    d.feed(b"RSET\r\n")
    assert d.conn.state is State.GREETED
    assert codes(d.feed(b"MAIL FROM:<a@b.example>\r\n")) == ["250 2.0.0"]


def test_http_requests_are_answered_and_closed() -> None:
    d = Driver()
    out = d.feed(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert codes(out) == ["521 5.7.0"]
    assert d.conn.closing


def test_replying_without_an_event_is_our_bug() -> None:
    conn = ServerConnection()
    conn.greet(Reply.of(220, None, "x"))
    with pytest.raises(ProtocolUsageError):
        conn.reply(Reply.of(250, "2.0.0", "Ok"))


def test_next_event_before_reply_is_our_bug() -> None:
    conn = ServerConnection()
    conn.greet(Reply.of(220, None, "x"))
    conn.receive_data(b"NOOP\r\nNOOP\r\n")
    conn.next_event()
    with pytest.raises(ProtocolUsageError):
        conn.next_event()


# -- strictness: bare CR/LF, NUL, smuggling -----------------------------------


@pytest.mark.parametrize(
    "line", [b"NOOP\n", b"NO\rOP\r\n", b"MAIL FROM:<a@b.example>\nRCPT TO:<x@y>\r\n"]
)
def test_bare_newline_in_a_command_is_refused_and_closes(line: bytes) -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    out = d.feed(line)
    assert codes(out) == ["500 5.5.2"]
    assert d.conn.closing
    assert not any(isinstance(e, (ev.MailFrom, ev.RcptTo)) for e in d.events)


def test_nul_in_a_command_is_refused() -> None:
    d = Driver()
    assert codes(d.feed(b"NO\x00OP\r\n")) == ["500 5.5.2"]
    assert not d.conn.closing


@pytest.mark.parametrize(
    "smuggled",
    [
        b"hi\r\n\n.\r\nMAIL FROM:<evil@x.example>\r\n",  # <LF>.<CR><LF>
        b"hi\r\n.\nMAIL FROM:<evil@x.example>\r\n",  # <CR><LF>.<LF>
        b"hi\n.\nMAIL FROM:<evil@x.example>\r\n",  # <LF>.<LF>
        b"hi\r.\rMAIL FROM:<evil@x.example>\r\n",  # <CR>.<CR>
        b"hi\r\n.\rMAIL FROM:<evil@x.example>\r\n",  # <CR><LF>.<CR>
    ],
)
def test_smuggling_attempts_never_split_a_message(smuggled: bytes) -> None:
    d = Driver()
    d.transaction()
    d.feed(b"DATA\r\n")
    out = d.feed(smuggled + b"RCPT TO:<victim@y.example>\r\nDATA\r\nevil\r\n.\r\n")
    assert codes(out) == ["550 5.6.0"]
    assert d.conn.closing
    assert d.bodies == []
    assert not any(isinstance(e, ev.MessageComplete) for e in d.events)
    assert [e for e in d.events if isinstance(e, ev.MailFrom) and "evil" in e.sender] == []


def test_bare_lf_body_split_across_reads_is_still_caught() -> None:
    d = Driver()
    d.transaction()
    d.feed(b"DATA\r\n")
    assert d.feed(b"line one\r\nline two\n") == ""
    out = d.feed(b".\nQUIT\r\n")
    assert codes(out) == ["550 5.6.0"]
    assert d.bodies == []


def test_only_crlf_dot_crlf_ends_data_even_across_reads() -> None:
    d = Driver()
    d.transaction()
    d.feed(b"DATA\r\n")
    for piece in (b"a\r\n", b".", b"\r", b"\n"):
        out = d.feed(piece)
    assert codes(out) == ["250 2.0.0"]
    assert d.bodies == [b"a\r\n"]


def test_nul_in_data_refuses_the_message_but_keeps_the_session() -> None:
    d = Driver()
    d.transaction()
    d.feed(b"DATA\r\n")
    assert codes(d.feed(b"a\x00b\r\n.\r\n")) == ["550 5.6.0"]
    assert not d.conn.closing
    assert codes(d.feed(b"MAIL FROM:<a@b.example>\r\n")) == ["250 2.0.0"]


def test_dot_unstuffing() -> None:
    d = Driver()
    d.transaction()
    d.feed(b"DATA\r\n")
    d.feed(b"..leading\r\n...\r\n.x\r\nmid.dle\r\n.\r\n")
    assert d.bodies == [b".leading\r\n..\r\nx\r\nmid.dle\r\n"]


def test_empty_body() -> None:
    d = Driver()
    d.transaction()
    d.feed(b"DATA\r\n")
    assert codes(d.feed(b".\r\n")) == ["250 2.0.0"]
    assert d.bodies == [b""]


# -- pipelining rules ---------------------------------------------------------


def test_data_sent_before_the_greeting_is_refused() -> None:
    conn = ServerConnection()
    conn.receive_data(b"EHLO eager.example\r\n")
    conn.greet(Reply.of(220, None, "x"))
    assert conn.data_to_send().startswith(b"554 5.5.0")
    assert conn.closing


@pytest.mark.parametrize("first", [b"EHLO c.example\r\n", b"HELO c.example\r\n"])
def test_commands_pipelined_after_hello_are_refused(first: bytes) -> None:
    d = Driver()
    out = d.feed(first + b"MAIL FROM:<a@b.example>\r\n")
    assert codes(out) == ["554 5.5.0"]
    assert d.conn.closing


def test_body_pipelined_after_data_is_refused() -> None:
    d = Driver()
    d.transaction()
    out = d.feed(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert codes(out) == ["554 5.5.0"]
    assert d.bodies == []


def test_plaintext_pipelined_after_starttls_is_discarded() -> None:
    d = Driver(starttls=True)
    d.feed(b"EHLO c.example\r\n")
    out = d.feed(b"STARTTLS\r\nMAIL FROM:<injected@x.example>\r\n")
    assert codes(out) == ["220 2.0.0"]
    assert d.conn.state is State.TLS_PENDING
    d.conn.receive_data(b"RCPT TO:<more@x.example>\r\n")
    d.conn.tls_started()
    assert d.feed(b"") == ""
    assert not any(isinstance(e, (ev.MailFrom, ev.RcptTo)) for e in d.events)
    assert codes(d.feed(b"MAIL FROM:<a@b.example>\r\n")) == ["503 5.5.1"]  # EHLO again first


def test_starttls_not_offered_or_twice() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    assert codes(d.feed(b"STARTTLS\r\n")) == ["502 5.5.1"]
    d = Driver(starttls=True)
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"STARTTLS\r\n")
    d.conn.tls_started()
    d.feed(b"EHLO c.example\r\n")
    assert codes(d.feed(b"STARTTLS\r\n")) == ["503 5.5.1"]


# -- limits -------------------------------------------------------------------


def test_command_line_limit() -> None:
    d = Driver()
    out = d.feed(b"NOOP " + b"x" * 600 + b"\r\n")
    assert codes(out) == ["500 5.5.2"]
    assert not d.conn.closing


def test_overlong_line_without_end_is_skipped_to_its_end() -> None:
    d = Driver()
    out = d.feed(b"x" * 20_000)
    assert codes(out) == ["500 5.5.2"]
    d.feed(b"y" * 5000 + b"\r\n")
    assert codes(d.feed(b"NOOP\r\n")) == ["250 2.0.0"]


def test_mail_gets_room_for_its_parameters() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    envid = b"E" * 100
    out = d.feed(
        b"MAIL FROM:<" + b"a" * 60 + b"@b.example> SIZE=10 RET=HDRS ENVID=" + envid + b"\r\n"
    )
    assert codes(out) == ["250 2.0.0"]


def test_recipient_limit_gives_452() -> None:
    d = Driver(SessionLimits(max_recipients=2))
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    out = d.feed(b"RCPT TO:<1@d.example>\r\nRCPT TO:<2@d.example>\r\nRCPT TO:<3@d.example>\r\n")
    assert codes(out) == ["250 2.0.0", "250 2.0.0", "452 4.5.3"]


def test_declared_size_over_limit_gives_552() -> None:
    d = Driver(SessionLimits(max_message_size=1000))
    d.feed(b"EHLO c.example\r\n")
    assert codes(d.feed(b"MAIL FROM:<a@b.example> SIZE=1001\r\n")) == ["552 5.3.4"]


def test_body_over_limit_gives_552_after_the_end() -> None:
    d = Driver(SessionLimits(max_message_size=1024))
    d.transaction()
    d.feed(b"DATA\r\n")
    out = d.feed(b"x" * 100 + b"\r\n")
    out += d.feed((b"y" * 100 + b"\r\n") * 20)
    assert out == ""
    assert codes(d.feed(b".\r\n")) == ["552 5.3.4"]
    assert d.bodies == []
    assert d.conn.state is State.GREETED


def test_header_size_limit() -> None:
    d = Driver(SessionLimits(max_header_size=1024))
    d.transaction()
    d.feed(b"DATA\r\n")
    out = d.feed(
        b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(40)) + b"\r\nbody\r\n.\r\n"
    )
    assert codes(out) == ["552 5.3.4"]


def test_body_line_length_limit() -> None:
    d = Driver(SessionLimits(max_line_length=1000))
    d.transaction()
    d.feed(b"DATA\r\n")
    assert codes(d.feed(b"x" * 998 + b"\r\n.\r\n")) == ["250 2.0.0"]
    d.transaction()
    d.feed(b"DATA\r\n")
    assert codes(d.feed(b"x" * 999 + b"\r\n.\r\n")) == ["550 5.6.0"]


def test_error_limit_disconnects_with_421() -> None:
    d = Driver(SessionLimits(max_errors=3))
    out = d.feed(b"FROB\r\nFROB\r\nFROB\r\nNOOP\r\n")
    assert codes(out) == ["502 5.5.2", "502 5.5.2", "502 5.5.2", "421 4.7.0"]
    assert d.conn.closing


# -- BDAT ---------------------------------------------------------------------


def test_bdat_chunks_make_one_message() -> None:
    d = Driver()
    d.transaction()
    out = d.feed(b"BDAT 5\r\nhello")
    assert codes(out) == ["250 2.0.0"]
    out = d.feed(b"BDAT 8 LAST\r\n world\r\n")
    assert codes(out) == ["250 2.0.0"]
    assert d.bodies == [b"hello world\r\n"]


def test_bdat_is_not_dot_unstuffed_and_may_span_reads() -> None:
    d = Driver()
    d.transaction()
    d.feed(b"BDAT 11 LAST\r\n..x\r\n")
    assert codes(d.feed(b".\r\n.\r\n")) == ["250 2.0.0"]
    assert d.bodies == [b"..x\r\n.\r\n.\r\n"]


def test_bdat_without_transaction_skips_its_octets() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    out = d.feed(b"BDAT 12 LAST\r\nRSET\r\nQUIT\r\nNOOP\r\n")
    assert codes(out) == ["503 5.5.1", "250 2.0.0"]
    assert not any(isinstance(e, ev.Quit) for e in d.events)


def test_bdat_with_bare_lf_is_refused() -> None:
    d = Driver()
    d.transaction()
    assert codes(d.feed(b"BDAT 4 LAST\r\na\nb\n")) == ["550 5.6.0"]
    assert d.bodies == []


def test_bdat_malformed_size_closes() -> None:
    d = Driver()
    d.transaction()
    assert codes(d.feed(b"BDAT many\r\n")) == ["501 5.5.4"]
    assert d.conn.closing


def test_data_after_bdat_is_refused() -> None:
    d = Driver()
    d.transaction()
    d.feed(b"BDAT 3\r\nabc")
    assert codes(d.feed(b"DATA\r\n")) == ["503 5.5.1"]


def test_bdat_over_size_limit() -> None:
    d = Driver(SessionLimits(max_message_size=1024))
    d.transaction()
    out = d.feed(b"BDAT 2000 LAST\r\n" + b"x" * 2000)
    assert codes(out) == ["552 5.3.4"]


# -- AUTH exchange (mechanisms come later) ------------------------------------


def test_auth_exchange_with_challenge() -> None:
    d = Driver(auth=("LOGIN",))
    d.feed(b"EHLO c.example\r\n")
    d.overrides[ev.AuthRequested] = Reply.of(334, None, "VXNlcm5hbWU6")
    d.feed(b"AUTH LOGIN\r\n")
    assert d.conn.state is State.AUTH
    d.feed(b"dXNlcg==\r\n")
    assert isinstance(d.events[-1], ev.AuthResponse)
    assert d.events[-1].data == b"user"
    assert d.conn.authenticated


def test_auth_cancel_and_bad_base64() -> None:
    d = Driver(auth=("PLAIN",))
    d.feed(b"EHLO c.example\r\n")
    d.overrides[ev.AuthRequested] = Reply.of(334, None, "")
    d.feed(b"AUTH PLAIN\r\n")
    assert codes(d.feed(b"*\r\n")) == ["501 5.7.0"]
    d.feed(b"AUTH PLAIN\r\n")
    assert codes(d.feed(b"!!!\r\n")) == ["501 5.5.2"]
    assert not d.conn.authenticated


def test_auth_not_offered_is_refused() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    assert codes(d.feed(b"AUTH PLAIN AGFAYg==\r\n")) == ["503 5.5.1"]


def test_auth_initial_response_is_decoded() -> None:
    d = Driver(auth=("PLAIN",))
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"AUTH PLAIN AHUAcA==\r\n")
    assert d.events[-1] == ev.AuthRequested("PLAIN", b"\x00u\x00p")


# -- refused sessions ---------------------------------------------------------


def test_554_greeting_only_honours_quit() -> None:
    conn = ServerConnection()
    conn.greet(Reply.of(554, "5.7.1", "go away"))
    conn.receive_data(b"EHLO x.example\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
    assert isinstance(conn.next_event(), ev.NeedData)
    out = conn.data_to_send().decode()
    assert codes(out) == ["554 5.7.1", "503 5.5.1", "503 5.5.1", "221 2.0.0"]
    assert conn.closing


def test_overlong_auth_line_gets_5_5_6_and_ends_the_exchange() -> None:
    d = Driver(auth=("LOGIN",))
    d.feed(b"EHLO c.example\r\n")
    d.overrides[ev.AuthRequested] = Reply.of(334, None, "VXNlcm5hbWU6")
    d.feed(b"AUTH LOGIN\r\n")
    out = d.feed(b"A" * 13_000)
    assert codes(out) == ["500 5.5.6"]
    d.feed(b"A\r\n")  # the rest of the over-long line is skipped
    assert d.conn.state is State.GREETED
