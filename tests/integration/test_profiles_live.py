"""Connection profiles on real sockets: clients bound to 127.0.0.2, .3, ... and ::1.

Linux routes all of 127.0.0.0/8 to loopback, so a client can choose its
source address and the gateway really matches profiles by it. Host names
come from a real DNS server on 127.0.0.1 (tests/dnsserver.py).
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import Certs, GatewayFactory, GatewayHandle, SinkHandle
from tests.dnsserver import DnsServer, start_dns

RECORDS = {
    ("5.0.0.127.in-addr.arpa", "PTR"): ["mail.partner.test."],
    ("mail.partner.test", "A"): ["127.0.0.5"],
    ("6.0.0.127.in-addr.arpa", "PTR"): ["fake.partner.test."],  # does not confirm:
    ("fake.partner.test", "A"): ["10.9.9.9"],  # the name points elsewhere
}


@pytest.fixture
async def dns_server() -> AsyncIterator[tuple[DnsServer, int]]:
    server, port = await start_dns(RECORDS)
    yield server, port
    assert server.transport is not None
    server.transport.close()


def profiles_config(sink_port: int, dns_port: int, certs: Certs | None = None) -> dict[str, Any]:
    listeners: list[dict[str, Any]] = [
        {"name": "mx", "address": "127.0.0.1:0", "security": "none"},
        {"name": "mx6", "address": "[::1]:0", "security": "none"},
    ]
    extra: dict[str, Any] = {}
    if certs is not None:
        listeners = [
            {"name": "mx", "address": "127.0.0.1:0", "security": "starttls", "certificate": "gw"}
        ]
        extra["certificates"] = [
            {"name": "gw", "cert": str(certs.cert_file), "key": str(certs.key_file)}
        ]
    return {
        "gateway": {"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
        "listeners": listeners,
        "send_connectors": [
            {
                "name": "anywhere",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink_port}},
            }
        ],
        "connection_profiles": [
            {"name": "trusted", "client_hosts": ["127.0.0.2"], "relay": "full"},
            {"name": "blocked", "client_hosts": ["127.0.0.3"], "relay": "blocked"},
            {"name": "v6", "client_hosts": ["::1"], "relay": "restricted-external"},
            {"name": "partner-by-name", "client_hosts": ["mail.partner.test"], "relay": "full"},
            {
                "name": "tls-required",
                "client_hosts": ["127.0.0.7"],
                "relay": "full",
                "inbound_tls": {"mandatory": True},
            },
            {
                "name": "partner-domain",
                "sender_domains": ["partner.example"],
                "inbound_tls": {"mandatory": True},
            },
        ],
        **extra,
    }


@pytest.fixture
async def gw(
    gateway_factory: GatewayFactory, sink: SinkHandle, dns_server: tuple[DnsServer, int]
) -> GatewayHandle:
    return await gateway_factory(**profiles_config(sink.port, dns_server[1]))


def send(
    port: int, source: str, sender: str, recipients: list[str], host: str = "127.0.0.1"
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(host, port, timeout=30, source_address=(source, 0)) as client:
        return client.sendmail(sender, recipients, b"Subject: t\r\n\r\nhi\r\n")


async def test_trusted_address_relays_anywhere(gw: GatewayHandle, sink: SinkHandle) -> None:
    await asyncio.to_thread(send, gw.port, "127.0.0.2", "app@example.com", ["x@foreign.example"])
    [(meta, body)] = await sink.wait_for(1)
    assert meta["recipients"] == ["x@foreign.example"]
    assert b"[127.0.0.2]" in body


async def test_blocked_address_gets_554_and_no_transaction(gw: GatewayHandle) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, local_addr=("127.0.0.3", 0)
    )
    assert await reader.readline() == b"554 5.7.1 Access denied\r\n"
    writer.write(b"EHLO x.example\r\n")
    assert (await reader.readline()).startswith(b"503 5.5.1")
    writer.write(b"QUIT\r\n")
    assert (await reader.readline()).startswith(b"221")
    writer.close()


async def test_default_profile_accepts_only_hosted_and_detects_spoofing(
    gw: GatewayHandle, sink: SinkHandle
) -> None:
    refused = await asyncio.to_thread(
        send, gw.port, "127.0.0.4", "someone@foreign.example", ["alice@example.com"]
    )
    assert refused == {}
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(
            send, gw.port, "127.0.0.4", "a@foreign.example", ["x@other.example"]
        )
    with pytest.raises(smtplib.SMTPSenderRefused) as caught:
        await asyncio.to_thread(
            send, gw.port, "127.0.0.4", "ceo@example.com", ["alice@example.com"]
        )
    assert caught.value.smtp_code == 553
    assert len(await sink.wait_for(1)) == 1


async def test_ipv6_client_matches_its_profile(gw: GatewayHandle, sink: SinkHandle) -> None:
    port6 = gw.ports["mx6"]
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(send, port6, "::1", "a@foreign.example", ["x@other.example"], "::1")
    await asyncio.to_thread(send, port6, "::1", "a@foreign.example", ["alice@example.com"], "::1")
    assert [m["recipients"] for m, _ in await sink.wait_for(1)] == [["alice@example.com"]]


async def test_forward_confirmed_host_name_matches(
    gw: GatewayHandle, sink: SinkHandle, dns_server: tuple[DnsServer, int]
) -> None:
    await asyncio.to_thread(send, gw.port, "127.0.0.5", "a@partner.test", ["x@foreign.example"])
    assert len(await sink.wait_for(1)) == 1
    assert ("5.0.0.127.in-addr.arpa.", "PTR") in dns_server[0].queries


async def test_host_name_that_does_not_confirm_never_matches(
    gw: GatewayHandle, sink: SinkHandle
) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(send, gw.port, "127.0.0.6", "a@partner.test", ["x@foreign.example"])
    assert await sink.wait_for(1, timeout=1.5) == []  # nothing arrives, even later


RELAY_TRICKS = [
    "victim@foreign.example",
    "VICTIM@FOREIGN.EXAMPLE",
    "victim%foreign.example@example.com",
    "foreign.example!victim@example.com",
    '"victim@foreign.example"@example.com',
    "@example.com:victim@foreign.example",
    "@example.com,@example.org:victim@foreign.example",
    "victim@[192.0.2.1]",
    "victim@[IPv6:2001:db8::1]",
    "victim@[127.0.0.1]",
    "victim@foreign.example.",
    "victim@example.com.foreign.example",
    "victim@foreign.example@example.com",
    "victim@xn--exmple-cua.com",
]


@pytest.mark.parametrize("source", ["127.0.0.4", "127.0.0.8"])
async def test_open_relay_probe_with_every_classic_trick_delivers_nothing(
    gw: GatewayHandle, sink: SinkHandle, source: str
) -> None:
    def probe() -> list[tuple[str, int]]:
        outcomes = []
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30, source_address=(source, 0)) as client:
            client.ehlo("probe.example")
            for trick in RELAY_TRICKS:
                client.mail("spammer@foreign.example")
                code, _ = client.docmd(f"RCPT TO:<{trick}>")
                if code < 400:
                    client.data(b"Subject: relay test\r\n\r\nspam\r\n")
                else:
                    client.rset()
                outcomes.append((trick, code))
        return outcomes

    outcomes = await asyncio.to_thread(probe)
    assert all(code >= 500 for _, code in outcomes), outcomes
    assert await sink.wait_for(1, timeout=1.5) == []  # nothing arrives, even later


async def test_mandatory_tls_by_profile_and_by_sender_domain(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    dns_server: tuple[DnsServer, int],
    certs: Certs,
) -> None:
    gw = await gateway_factory(**profiles_config(sink.port, dns_server[1], certs))

    def attempt(source: str, sender: str) -> tuple[int, int]:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30, source_address=(source, 0)) as client:
            client.ehlo("c.example")
            plain, _ = client.mail(sender)
            client.rset()
            client.starttls(context=ssl.create_default_context(cafile=str(certs.ca_file)))
            client.ehlo("c.example")
            secure, _ = client.mail(sender)
            return plain, secure

    assert await asyncio.to_thread(attempt, "127.0.0.7", "a@elsewhere.example") == (530, 250)
    assert await asyncio.to_thread(attempt, "127.0.0.8", "a@partner.example") == (530, 250)
    assert await asyncio.to_thread(attempt, "127.0.0.8", "a@elsewhere.example") == (250, 250)
