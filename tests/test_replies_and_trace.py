"""Replies render correctly; trace headers say how a message arrived."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from smtpgate.inbound.trace import TraceFacts, protocol_name, received_header
from smtpgate.proto.client import parse_reply, stuff_dots
from smtpgate.proto.replies import Reply


def test_multiline_reply_is_one_byte_string_with_status_on_each_line() -> None:
    reply = Reply.of(550, "5.7.1", "first", "second")
    assert reply.to_bytes() == b"550-5.7.1 first\r\n550 5.7.1 second\r\n"


@pytest.mark.parametrize(
    ("code", "status", "lines"),
    [
        (250, "5.0.0", ("x",)),
        (199, None, ("x",)),
        (250, "2.0", ("x",)),
        (250, None, ("a\r\nb",)),
        (250, None, ()),
    ],
)
def test_invalid_replies_cannot_be_built(
    code: int, status: str | None, lines: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=r"."):
        Reply(code, status, lines)


def test_client_reply_parsing() -> None:
    reply = parse_reply([b"250-2.1.5 first", b"250 2.1.5 second"])
    assert isinstance(reply, Reply)
    assert reply == Reply.of(250, "2.1.5", "first", "second")
    assert parse_reply([b"550 oops"]) == Reply.of(550, None, "oops")
    assert parse_reply([b"250 5.1.1 mismatched"]) == Reply.of(250, None, "5.1.1 mismatched")


def test_stuff_dots_across_chunks() -> None:
    assert stuff_dots(b".a\r\n.b\r\nc.d\r\n", True) == b"..a\r\n..b\r\nc.d\r\n"
    assert stuff_dots(b".x", False) == b".x"


@pytest.mark.parametrize(
    ("esmtp", "tls", "auth", "name"),
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, True, True, "ESMTPSA"),
        (True, False, True, "ESMTPA"),
    ],
)
def test_rfc3848_protocol_names(esmtp: bool, tls: bool, auth: bool, name: str) -> None:
    assert protocol_name(esmtp, tls, auth) == name


def test_received_header() -> None:
    facts = TraceFacts(
        helo="client\r\nInjected: yes",
        client_ip="2001:db8::1",
        client_name=None,
        by_host="gw.test",
        esmtp=True,
        tls="TLSv1.3 TLS_AES_128_GCM_SHA256",
        authenticated=False,
        queue_id="Q1",
        recipient="a@example.com",
    )
    header = received_header(facts, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert header == (
        b"Received: from client??Injected: yes (unknown [IPv6:2001:db8::1])\r\n"
        b"\t(using TLSv1.3 TLS_AES_128_GCM_SHA256)\r\n"
        b"\tby gw.test (smtpgate) with ESMTPS id Q1\r\n"
        b"\tfor <a@example.com>;\r\n"
        b"\tFri, 02 Jan 2026 03:04:05 +0000\r\n"
    )
