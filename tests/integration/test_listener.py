"""Listener behaviour: connection limits, timeouts, PROXY protocol."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

from smtpgate.inbound.proxy import V2_SIGNATURE
from tests.conftest import GatewayFactory, SinkHandle


async def _greeting(port: int) -> tuple[bytes, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await asyncio.wait_for(reader.readline(), 5), writer


async def test_per_ip_connection_limit(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(limits={"max_connections_per_ip": 2})
    first, w1 = await _greeting(gw.port)
    second, w2 = await _greeting(gw.port)
    third, w3 = await _greeting(gw.port)
    assert first.startswith(b"220 ")
    assert second.startswith(b"220 ")
    assert third.startswith(b"421 4.7.0")
    for writer in (w1, w2, w3):
        writer.close()


async def test_global_connection_limit(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(limits={"max_connections": 1})
    first, w1 = await _greeting(gw.port)
    second, w2 = await _greeting(gw.port)
    assert first.startswith(b"220 ")
    assert second == b"421 4.7.0 Error: too many connections, try again later\r\n"
    w1.close()
    w2.close()


async def test_idle_client_is_timed_out(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(timeouts={"command": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await reader.readline()
    assert await asyncio.wait_for(reader.readline(), 5) == b"421 4.4.2 Error: timeout exceeded\r\n"
    assert await reader.read() == b""
    writer.close()


async def test_data_timeout_resets_while_data_flows(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(timeouts={"data": 0.6})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await reader.readline()
    writer.write(b"HELO c.example\r\n")
    await reader.readline()
    for line in (b"MAIL FROM:<a@x.example>\r\n", b"RCPT TO:<alice@example.com>\r\n", b"DATA\r\n"):
        writer.write(line)
        await reader.readline()
    for _ in range(5):  # 1.5 s in all, never 0.6 s of silence, above min_data_rate
        writer.write(b"x" * 998 + b"\r\n")
        await asyncio.sleep(0.3)
    writer.write(b".\r\n")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250 2.0.0")
    writer.close()


async def _send_through_proxy(port: int, header: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(header)
    greeting = await asyncio.wait_for(reader.readline(), 5)
    if not greeting:
        return b""
    for line in (
        b"HELO c.example\r\n",
        b"MAIL FROM:<a@x.example>\r\n",
        b"RCPT TO:<alice@example.com>\r\n",
        b"DATA\r\n",
    ):
        writer.write(line)
        await reader.readline()
    writer.write(b"Subject: proxied\r\n\r\nhi\r\n.\r\n")
    reply = await reader.readline()
    writer.close()
    return reply


def _v2(ip: str, port: int) -> bytes:
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        body = (
            address.packed + ipaddress.ip_address("127.0.0.1").packed + struct.pack("!HH", port, 25)
        )
        return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body
    body = address.packed + ipaddress.ip_address("::1").packed + struct.pack("!HH", port, 25)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21, len(body)) + body


async def test_proxy_protocol_v1_and_v2_name_the_real_client(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    gw = await gateway_factory(
        listeners=[
            {"name": "mx", "address": "127.0.0.1:0", "security": "none", "proxy_protocol": True}
        ]
    )
    v1 = b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 25\r\n"
    assert (await _send_through_proxy(gw.port, v1)).startswith(b"250 2.0.0")
    assert (await _send_through_proxy(gw.port, _v2("2001:db8::7", 40001))).startswith(b"250 ")
    bodies = sorted(
        (body for _, body in await sink.wait_for(2)), key=lambda b: b"192.0.2.10" not in b
    )
    assert b"[192.0.2.10]" in bodies[0]
    assert b"[IPv6:2001:db8::7]" in bodies[1]


async def test_proxy_listener_closes_connections_without_a_header(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    gw = await gateway_factory(
        listeners=[
            {"name": "mx", "address": "127.0.0.1:0", "security": "none", "proxy_protocol": True}
        ]
    )
    assert await _send_through_proxy(gw.port, b"HELO sneaky.example\r\n") == b""
    assert await sink.wait_for(1, timeout=1.5) == []  # nothing arrives, even later


async def test_the_banner_is_configurable(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(gateway={"banner": "ESMTP ready"})
    greeting, writer = await _greeting(gw.port)
    assert greeting == b"220 gw.test ESMTP ready\r\n"
    writer.close()
