"""PROXY protocol v1 and v2 headers (HAProxy's ``proxy-protocol.txt``), sans-IO.

A listener with ``proxy_protocol: true`` trusts its load balancer to tell it
the real client address. The header is mandatory there: a connection that
does not start with a valid one is closed without a word, as Postfix does.
Only TCP over IPv4/IPv6 is taken; ``LOCAL`` (health checks) keeps the
balancer's own address.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the longest v1 line, CRLF included


class ProxyHeaderError(Exception):
    """The bytes are not a PROXY header we accept."""


@dataclass(frozen=True, slots=True)
class ProxiedAddress:
    """The client as the balancer saw it; ``None`` for LOCAL/UNKNOWN."""

    client: tuple[str, int] | None
    header_length: int


def parse_proxy_header(data: bytes) -> ProxiedAddress | None:
    """Parse a header at the start of ``data``; ``None`` means "need more bytes"."""
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if b"PROXY "[: len(data)] == data[:6]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY header")


def _parse_v1(data: bytes) -> ProxiedAddress | None:
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    words = data[:end].decode("ascii", "replace").split(" ")
    if words[:2] == ["PROXY", "UNKNOWN"]:
        return ProxiedAddress(None, end + 2)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        address = ipaddress.ip_address(words[2])
        port = int(words[4])
    except ValueError as exc:
        raise ProxyHeaderError("bad address in PROXY v1 line") from exc
    if (address.version == 4) != (words[1] == "TCP4") or not 0 < port < 65536:
        raise ProxyHeaderError("bad address in PROXY v1 line")
    return ProxiedAddress((str(address), port), end + 2)


def _parse_v2(data: bytes) -> ProxiedAddress | None:
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY version")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    command = version_command & 0x0F
    if command == 0:  # LOCAL: a health check from the balancer itself
        return ProxiedAddress(None, total)
    if command != 1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    body = data[16:total]
    if family == 0x11 and length >= 12:  # TCP over IPv4
        source = str(ipaddress.IPv4Address(body[0:4]))
        (port,) = struct.unpack("!H", body[8:10])
    elif family == 0x21 and length >= 36:  # TCP over IPv6
        source = str(ipaddress.IPv6Address(body[0:16]))
        (port,) = struct.unpack("!H", body[32:34])
    elif family == 0x00:
        return ProxiedAddress(None, total)
    else:
        raise ProxyHeaderError("unsupported PROXY v2 address family")
    return ProxiedAddress((source, port), total)
