"""Issue 10 findings replayed on loopback sockets against an in-process gateway:
unbounded input before the greeting, connection slots held by trickling,
refusal floods in the log, blocked clients, STARTTLS handshake timeouts and
``RCPT TO:<Postmaster>``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from smtpgate.config.schema import GatewayConfig, RelayMode
from smtpgate.inbound.server import TOO_MANY, RefusalLog
from smtpgate.inbound.session import Session
from smtpgate.policy.relay import decide_relay, postmaster_address
from smtpgate.proto.server import POSTMASTER
from tests.conftest import Certs, GatewayFactory, GatewayHandle, SinkHandle
from tests.dnsserver import DnsServer, start_dns

# -- item 22: nothing is read before the greeting --------------------------------


class SlowDns(DnsServer):
    """The test DNS server, answering every query only after ``delay`` seconds."""

    delay = 1.5

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay, DnsServer.datagram_received, self, data, addr)


@pytest.fixture
async def slow_dns() -> AsyncIterator[int]:
    server, port = await start_dns({("mail.partner.test", "A"): ["127.0.0.5"]})
    server.__class__ = SlowDns
    yield port
    assert server.transport is not None
    server.transport.close()


async def _at_the_body(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client past HELO, MAIL, RCPT and DATA's 354: the body comes next."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"HELO c.example\r\n")
    await reader.readline()
    for line in (b"MAIL FROM:<a@x.example>\r\n", b"RCPT TO:<alice@example.com>\r\n", b"DATA\r\n"):
        writer.write(line)
        await reader.readline()
    return reader, writer


async def _waiting_for_dns(factory: GatewayFactory, slow_dns: int) -> GatewayHandle:
    """A gateway whose greeting waits for reverse DNS (a host-name profile) from a
    server that answers slowly."""
    return await factory(
        gateway={"dns": {"nameservers": ["127.0.0.1"], "port": slow_dns, "timeout": 5}},
        connection_profiles=[{"name": "partner", "client_hosts": ["mail.partner.test"]}],
    )


def _sessions(gw: GatewayHandle) -> list[Session]:
    return list(gw.gateway.server.sessions)


@pytest.mark.both_loops
async def test_a_client_that_talks_first_cannot_push_data_in(
    gateway_factory: GatewayFactory, slow_dns: int
) -> None:
    gw = await _waiting_for_dns(gateway_factory, slow_dns)
    client = socket.create_connection(("127.0.0.1", gw.port))
    client.setblocking(False)
    chunk, sent, started = b"EHLO flood.example\r\n" * 3277, 0, time.monotonic()
    loop = asyncio.get_running_loop()
    stalled_since = None
    while sent < 256 * 2**20 and time.monotonic() - started < 1.0:  # up to 256 MiB in 1 s
        try:
            sent += client.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            await asyncio.sleep(0.01)
        else:
            await asyncio.sleep(0)
    [session] = _sessions(gw)
    assert session.conn.pending_input == 0  # nothing kept...
    assert stalled_since is not None, f"the client's writes never blocked ({sent} octets)"
    assert sent < 64 * 2**20  # ...and only the kernel's socket buffers took any
    client.setblocking(True)
    client.settimeout(10)
    reply = await loop.run_in_executor(None, client.recv, 4096)
    assert reply == b"554 5.5.0 Error: SMTP protocol violation, data sent before greeting\r\n"
    with contextlib.suppress(ConnectionResetError):
        assert await loop.run_in_executor(None, client.recv, 4096) == b""
    client.close()


async def test_the_greeting_still_waits_for_dns_for_a_patient_client(
    gateway_factory: GatewayFactory, slow_dns: int
) -> None:
    gw = await _waiting_for_dns(gateway_factory, slow_dns)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 gw.test")
    writer.write(b"EHLO c.example\r\n")
    assert (await reader.readline()).startswith(b"250-gw.test")
    writer.close()


# -- item 23: deadlines that trickling cannot extend -------------------------------


async def _trickle(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes, pause: float
) -> tuple[int, bytes]:
    """Send ``data`` one octet every ``pause`` seconds until the server says
    something; return how many octets went out and what it said."""
    reply = asyncio.ensure_future(reader.readline())
    sent = 0
    for octet in data:
        if reply.done():
            break
        writer.write(bytes([octet]))
        sent += 1
        await asyncio.wait([reply], timeout=pause)
    return sent, await asyncio.wait_for(reply, 5)


@pytest.mark.both_loops
async def test_trickling_a_command_does_not_extend_the_command_deadline(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(timeouts={"command": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await reader.readline()
    line = b"EHLO " + b"c" * 70 + b".example\r\n"  # 8 s at 10 octets/s
    sent, reply = await _trickle(writer, reader, line, 0.1)
    assert reply == b"421 4.4.2 Error: timeout exceeded\r\n"
    assert sent < len(line) // 2
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


@pytest.mark.both_loops
async def test_trickling_a_body_does_not_extend_the_data_deadline(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    gw = await gateway_factory(timeouts={"data": 0.5})  # min_data_rate: 500 octets/s
    reader, writer = await _at_the_body(gw.port)
    body = b"Subject: slow\r\n\r\n" + b"x" * 80 + b"\r\n.\r\n"  # 10 s at 10 octets/s
    sent, reply = await _trickle(writer, reader, body, 0.1)
    assert reply == b"421 4.4.2 Error: timeout exceeded\r\n"
    assert sent < len(body) // 2
    writer.close()
    assert await sink.wait_for(1, timeout=1) == []


async def test_a_body_sent_at_a_fair_rate_may_take_longer_than_the_data_timeout(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    gw = await gateway_factory(timeouts={"data": 0.5}, limits={"min_data_rate": 1000})
    reader, writer = await _at_the_body(gw.port)
    for _ in range(8):  # 1.6 s in all; 1000 octets every 0.2 s is 5000 octets/s
        writer.write(b"y" * 998 + b"\r\n")
        await asyncio.sleep(0.2)
    writer.write(b".\r\n")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250 2.0.0")
    writer.close()


async def _connect_from(port: int, source: str) -> tuple[bytes, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return await asyncio.wait_for(reader.readline(), 5), writer


async def test_connections_reserved_for_profiles_let_a_partner_in_during_a_flood(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(
        limits={"max_connections": 10, "profile_reserve": 0.2},
        connection_profiles=[
            {"name": "partner", "client_hosts": ["127.0.0.2"], "relay": "full"},
            {"name": "shut", "client_hosts": ["127.0.0.3"], "relay": "blocked"},
        ],
    )
    flood = [await _connect_from(gw.port, "127.0.0.1") for _ in range(10)]
    assert [g[:3] for g, _ in flood] == [b"220"] * 8 + [b"421"] * 2
    blocked, w_blocked = await _connect_from(gw.port, "127.0.0.3")  # not a known client
    assert blocked.startswith(b"421 4.7.0")
    partner = [await _connect_from(gw.port, "127.0.0.2") for _ in range(3)]
    assert [g[:3] for g, _ in partner] == [b"220", b"220", b"421"]  # then the limit is hit
    for _, writer in [*flood, *partner, (blocked, w_blocked)]:
        writer.close()


# -- item 30(c) and item 21: refusals in the log -----------------------------------


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_a_flood_of_refused_connections_is_summarised(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(limits={"max_connections_per_ip": 1})
    now = [1000.0]
    gw.gateway.server.refusals = RefusalLog(interval=60, clock=lambda: now[0])
    first, writer = await _connect_from(gw.port, "127.0.0.1")
    assert first.startswith(b"220")
    with capture_logs() as logs:
        for _ in range(30):
            refused, other = await _connect_from(gw.port, "127.0.0.1")
            assert refused.startswith(b"421 4.7.0")
            other.close()
        now[0] += 61
        gw.gateway.server.refusals.flush()
    [line] = _events(logs, "connection refused")
    assert line["client"] == "127.0.0.1"
    assert line["reply"].startswith("421 4.7.0")
    assert line["why"] == "limits.max_connections_per_ip (1) reached"
    [summary] = _events(logs, "connections refused")
    assert (summary["client"], summary["count"], summary["seconds"]) == ("127.0.0.1", 29, 61)
    writer.close()


async def test_refusal_log_forgets_a_quiet_address_and_bounds_what_it_tracks() -> None:
    now = [0.0]
    refusals = RefusalLog(interval=10, clock=lambda: now[0], max_addresses=2)
    with capture_logs() as logs:
        for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
            refusals.refused(address, TOO_MANY, "full")
        now[0] = 11
        refusals.flush()  # .1 and .2 had no further refusal: forgotten
        refusals.refused("192.0.2.1", TOO_MANY, "full")  # so it is logged in full again
        refusals.close()
    full = [entry["client"] for entry in _events(logs, "connection refused")]
    assert full == ["192.0.2.1", "192.0.2.2", "192.0.2.1"]
    summaries = {entry["client"]: entry["count"] for entry in _events(logs, "connections refused")}
    assert summaries == {"other": 2}  # .3 and .4 came while two addresses were tracked


async def test_a_blocked_client_is_logged_with_the_reply_and_the_reason(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(
        connection_profiles=[{"name": "shut", "client_hosts": ["127.0.0.3"], "relay": "blocked"}]
    )
    with capture_logs() as logs:
        greeting, writer = await _connect_from(gw.port, "127.0.0.3")
        writer.close()
    assert greeting == b"554 5.7.1 Access denied\r\n"
    [line] = _events(logs, "connection refused")
    assert line["client"] == "127.0.0.3"
    assert line["profile"] == "shut"
    assert line["reply"] == "554 5.7.1 Access denied"
    assert "blocked" in line["why"]
    assert "client IP matches 127.0.0.3" in line["why"]


# -- item 29: STARTTLS handshake timeouts are logged -------------------------------


@pytest.mark.both_loops
async def test_a_starttls_handshake_timeout_is_logged_and_frees_the_slot(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        listeners=[
            {"name": "mx", "address": "127.0.0.1:0", "security": "starttls", "certificate": "gw"}
        ],
        certificates=[{"name": "gw", "cert": str(certs.cert_file), "key": str(certs.key_file)}],
        timeouts={"tls_handshake": 0.3},
    )
    with capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        await reader.readline()
        writer.write(b"EHLO c.example\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(b"STARTTLS\r\n")
        assert (await reader.readline()).startswith(b"220 2.0.0")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # no ClientHello: cut
        for _ in range(50):
            if not gw.gateway.server.sessions:
                break
            await asyncio.sleep(0.02)
    [line] = _events(logs, "TLS handshake failed")
    assert (line["client"], line["phase"]) == ("127.0.0.1", "STARTTLS")
    assert gw.gateway.server.sessions == set()
    assert (gw.gateway.server.counts.total(), gw.gateway.server.counts.from_ip("127.0.0.1")) == (
        0,
        0,
    )
    writer.close()


# -- item 30(b): RCPT TO:<Postmaster> -----------------------------------------------


def _corp_connector(sink_port: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "to-sink",
            "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink_port}},
            "security": "none",
        }
    ]


async def _send(port: int, source: str, rcpt: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    replies = [await reader.readline()]
    for line in (b"HELO c.example\r\n", b"MAIL FROM:<someone@outside.example>\r\n", rcpt):
        writer.write(line)
        replies.append(await asyncio.wait_for(reader.readline(), 5))
    if replies[-1].startswith(b"250"):
        writer.write(b"DATA\r\n")
        replies.append(await reader.readline())
        writer.write(b"Subject: hello postmaster\r\n\r\nhi\r\n.\r\n")
        replies.append(await reader.readline())
    writer.close()
    return replies


@pytest.mark.parametrize("rcpt", [b"RCPT TO:<postmaster>\r\n", b"RCPT TO:<PostMaster>\r\n"])
async def test_postmaster_without_a_domain_reaches_the_admin_address(
    gateway_factory: GatewayFactory, sink: SinkHandle, rcpt: bytes
) -> None:
    gw = await gateway_factory(
        gateway={"admin_address": "admin@corp.example"},  # not a hosted domain
        send_connectors=_corp_connector(sink.port),
    )
    refused = await _send(gw.port, "127.0.0.1", b"RCPT TO:<admin@corp.example>\r\n")
    assert refused[-1].startswith(b"554 5.7.1")  # relay none: not by its own address
    replies = await _send(gw.port, "127.0.0.1", rcpt)
    assert replies[3] == b"250 2.1.5 Ok\r\n"
    assert replies[-1].startswith(b"250 2.0.0")
    [(meta, _)] = await sink.wait_for(1)
    assert meta["recipients"] == ["admin@corp.example"]


async def test_postmaster_goes_to_the_first_hosted_domain_without_an_admin_address(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    gw = await gateway_factory(gateway={"admin_address": None})
    replies = await _send(gw.port, "127.0.0.1", b"RCPT TO:<postmaster>\r\n")
    assert replies[-1].startswith(b"250 2.0.0")
    [(meta, _)] = await sink.wait_for(1)
    assert meta["recipients"] == ["postmaster@example.com"]


async def test_a_blocked_client_cannot_reach_postmaster(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        connection_profiles=[{"name": "shut", "client_hosts": ["127.0.0.3"], "relay": "blocked"}]
    )
    replies = await _send(gw.port, "127.0.0.3", b"RCPT TO:<postmaster>\r\n")
    assert replies[0].startswith(b"554 5.7.1")
    assert all(not reply.startswith(b"250") for reply in replies)


@pytest.mark.parametrize("mode", ["none", "restricted-external", "restricted-internal", "full"])
def test_postmaster_passes_relay_control_in_every_mode_but_blocked(mode: RelayMode) -> None:
    assert decide_relay(mode, POSTMASTER, frozenset({"example.com"})).accepted
    assert not decide_relay("blocked", POSTMASTER, frozenset({"example.com"})).accepted
    if mode != "full":  # only the bare <postmaster> passes, not any postmaster@
        assert not decide_relay(mode, "postmaster@foreign.example", frozenset()).accepted


def test_postmaster_address_prefers_the_admin_address() -> None:
    def config(**gateway: Any) -> GatewayConfig:
        return GatewayConfig.model_validate(
            {"gateway": {"hostname": "gw.test", **gateway}, "hosted_domains": ["b.example"]}
        )

    assert postmaster_address(config(admin_address="ops@corp.example")) == "ops@corp.example"
    assert postmaster_address(config()) == "postmaster@b.example"
    bare = GatewayConfig.model_validate({"gateway": {"hostname": "gw.test"}})
    assert postmaster_address(bare) == "postmaster@gw.test"
