"""PROXY protocol header parsing (sans-IO)."""

from __future__ import annotations

import struct

import pytest

from smtpgate.inbound.proxy import V2_SIGNATURE, ProxyHeaderError, parse_proxy_header


def test_v1_tcp4_and_tcp6() -> None:
    parsed = parse_proxy_header(b"PROXY TCP4 192.0.2.1 10.0.0.1 5555 25\r\nEHLO")
    assert parsed is not None
    assert parsed.client == ("192.0.2.1", 5555)
    assert parsed.header_length == len(b"PROXY TCP4 192.0.2.1 10.0.0.1 5555 25\r\n")
    parsed = parse_proxy_header(b"PROXY TCP6 2001:db8::1 ::1 5555 25\r\n")
    assert parsed is not None
    assert parsed.client == ("2001:db8::1", 5555)


def test_v1_unknown_keeps_the_balancer_address() -> None:
    parsed = parse_proxy_header(b"PROXY UNKNOWN\r\n")
    assert parsed is not None
    assert parsed.client is None


def test_incomplete_headers_ask_for_more() -> None:
    assert parse_proxy_header(b"PROXY TCP4 192.0.2.1") is None
    assert parse_proxy_header(V2_SIGNATURE[:8]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO x\r\n",
        b"PROXY TCP4 192.0.2.1 10.0.0.1 5555\r\n",
        b"PROXY TCP4 2001:db8::1 ::1 5555 25\r\n",  # family mismatch
        b"PROXY TCP4 192.0.2.1 10.0.0.1 99999 25\r\n",
        b"PROXY " + b"x" * 200,
        V2_SIGNATURE + struct.pack("!BBH", 0x31, 0x11, 0),  # version 3
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 0),  # AF_UNIX
    ],
)
def test_bad_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


def test_v2_local_command() -> None:
    parsed = parse_proxy_header(V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0))
    assert parsed is not None
    assert parsed.client is None
