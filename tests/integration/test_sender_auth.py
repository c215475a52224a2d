"""Sender authentication with a real ``smtpgate serve``, a real sink and a real
DNS server on loopback serving SPF, DKIM and DMARC records.

Inbound: SPF fail + DMARC p=reject from a profile that enforces → 550 5.7.1
naming DMARC and nothing at the sink (and the same from a reporting profile
delivered with ``dmarc=fail``); a message signed with a published key →
``dkim=pass`` in the Authentication-Results at the sink, a forged one with
our authserv-id removed. Outbound: mail from an internal client is signed
with a key made by ``smtpgate dkim keygen`` and verifies with dkimpy against
the published record.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import re
import smtplib
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import dns.message
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from smtpgate.content import senderauth
from smtpgate.content.quarantine import QuarantineStore, quarantine_dir
from smtpgate.pools import Pool
from tests.conftest import SMTPGATE, GatewayFactory, GatewayProcess, SinkHandle
from tests.dnsserver import DnsServer, start_dns

INBOUND_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pkcs1(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _txt_value(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    value = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def keygen(directory: Path) -> tuple[Path, str]:
    """``smtpgate dkim keygen example.com out1``: the key file and the TXT value."""
    done = subprocess.run(
        [SMTPGATE, "dkim", "keygen", "example.com", "out1", "--out", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    record = re.search(r"^out1\._domainkey\.example\.com\. IN TXT (.+)$", done.stdout, re.M)
    assert record is not None, done.stdout
    path = directory / "example.com.out1.key"
    return path, record.group(1)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[DnsServer, int, Path]]:
    key_file, out_record = keygen(tmp_path)
    records = {
        ("spoofed.test", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"'],
        ("_dmarc.spoofed.test", "TXT"): ['"v=DMARC1; p=reject"'],
        ("held.test", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"'],
        ("_dmarc.held.test", "TXT"): ['"v=DMARC1; p=quarantine"'],
        ("signed.test", "TXT"): ['"v=spf1 -all"'],
        ("_dmarc.signed.test", "TXT"): ['"v=DMARC1; p=reject; adkim=s"'],
        ("s1._domainkey.signed.test", "TXT"): [_txt_value(INBOUND_KEY)],
        ("out1._domainkey.example.com", "TXT"): [out_record],
    }
    server, port = await start_dns(records)
    yield server, port, key_file
    assert server.transport is not None
    server.transport.close()


def _config(dns_port: int, key_file: Path) -> dict[str, Any]:
    return {
        "gateway": {"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
        "connection_profiles": [
            {"name": "inside", "client_hosts": ["127.0.0.2"], "relay": "full"},
            {"name": "lenient", "client_hosts": ["127.0.0.9"], "dmarc_policy": "report"},
        ],
        "sender_auth": {
            "dkim_signing": [
                {"domain": "example.com", "selector": "out1", "key_file": str(key_file)}
            ]
        },
    }


@pytest.fixture
async def gateway(
    world: tuple[DnsServer, int, Path],
    sink: SinkHandle,
    gateway_process: Callable[..., GatewayProcess],
) -> GatewayProcess:
    _server, port, key_file = world
    return await asyncio.to_thread(gateway_process, sink.port, **_config(port, key_file))


def send(port: int, source: str, sender: str, message: bytes) -> tuple[int, bytes]:
    """The DATA reply the client got."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        assert client.mail(sender)[0] == 250
        assert client.rcpt("alice@example.com")[0] == 250
        return client.data(message)


def message(sender: str, *extra: str) -> bytes:
    lines = [
        *extra,
        f"From: Sender <{sender}>",
        "To: alice@example.com",
        "Subject: hello",
        "Date: Sun, 29 Nov 2026 12:00:00 +0000",
        "Message-ID: <1@test>",
    ]
    return ("\r\n".join(lines) + "\r\n\r\nbody line\r\n").encode()


def results(body: bytes) -> list[str]:
    parsed = email.message_from_bytes(body, policy=email.policy.compat32)
    return [" ".join(str(v).split()) for v in parsed.get_all("Authentication-Results", [])]


async def test_dmarc_reject_is_enforced_per_profile(
    gateway: GatewayProcess, sink: SinkHandle
) -> None:
    forged = message("ceo@spoofed.test")
    code, text = await asyncio.to_thread(
        send, gateway.port, "127.0.0.1", "ceo@spoofed.test", forged
    )
    assert code == 550
    assert text.startswith(b"5.7.1")
    assert b"DMARC" in text
    assert b"spoofed.test" in text
    # the reporting profile delivers the same, with the verdict written
    code, _ = await asyncio.to_thread(send, gateway.port, "127.0.0.9", "ceo@spoofed.test", forged)
    assert code == 250
    [(_meta, body)] = await sink.wait_for(1)
    [ours] = results(body)
    assert ours.startswith("gw.test;")
    assert "spf=fail smtp.mailfrom=spoofed.test" in ours
    assert "dmarc=fail (p=reject dis=reject) header.from=spoofed.test" in ours
    assert len(sink.messages()) == 1  # the refused one never arrived


async def test_valid_dkim_passes_and_forged_results_are_removed(
    gateway: GatewayProcess, sink: SinkHandle
) -> None:
    unsigned = message(
        "news@signed.test",
        "Authentication-Results: gw.test; dkim=pass header.d=bank.example",
        "Authentication-Results: (forged) GW.TEST ; spf=pass",
        "Authentication-Results: mx.other.example; spf=pass smtp.mailfrom=signed.test",
    )
    signature = dkim.sign(
        unsigned, b"s1", b"signed.test", _pkcs1(INBOUND_KEY), canonicalize=(b"relaxed", b"relaxed")
    )
    signed = signature + unsigned
    code, _ = await asyncio.to_thread(send, gateway.port, "127.0.0.1", "bounce@signed.test", signed)
    assert code == 250
    [(_meta, body)] = await sink.wait_for(1)
    found = results(body)
    assert len(found) == 2, found
    ours = next(r for r in found if r.startswith("gw.test;"))
    assert "spf=fail smtp.mailfrom=signed.test" in ours
    assert "dkim=pass header.d=signed.test header.s=s1" in ours
    assert "dmarc=pass" in ours
    assert "header.from=signed.test" in ours
    assert "bank.example" not in body.decode()
    assert any(r.startswith("mx.other.example;") for r in found)


async def test_outbound_mail_is_signed_and_verifies(
    world: tuple[DnsServer, int, Path], gateway: GatewayProcess, sink: SinkHandle
) -> None:
    _server, dns_port, key_file = world
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    code, _ = await asyncio.to_thread(
        send, gateway.port, "127.0.0.2", "app@example.com", message("app@example.com")
    )
    assert code == 250
    [(_meta, body)] = await sink.wait_for(1)
    assert body.startswith(b"DKIM-Signature:") or b"\r\nDKIM-Signature:" in body
    assert b"Authentication-Results" not in body  # from inside: not verified

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], dns_port

    def published(name: bytes, timeout: float = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        return b"".join(next(iter(answer)).strings)

    assert await asyncio.to_thread(dkim.verify, body, dnsfunc=published)
    signature = re.search(rb"DKIM-Signature:(.*?)\r\n(?![ \t])", body, re.S)
    assert signature is not None
    fields = signature.group(1)
    assert b"d=example.com" in fields
    assert b"s=out1" in fields
    assert b"c=relaxed/relaxed" in fields


async def test_dmarc_quarantine_holds_the_message(
    tmp_path: Path, gateway: GatewayProcess, sink: SinkHandle
) -> None:
    code, _ = await asyncio.to_thread(
        send, gateway.port, "127.0.0.1", "ceo@held.test", message("ceo@held.test")
    )
    assert code == 250  # held, as for any accepted message
    [held] = QuarantineStore(quarantine_dir(tmp_path / "gwp")).entries()
    assert held.envelope.sender == "ceo@held.test"
    assert "quarantined by DMARC policy of held.test" in held.summary
    # a later message arrives; the held one never does
    code, _ = await asyncio.to_thread(
        send, gateway.port, "127.0.0.9", "ceo@held.test", message("ceo@held.test")
    )
    assert code == 250
    [(meta, _body)] = await sink.wait_for(1)
    assert meta["sender"] == "ceo@held.test"
    assert len(sink.messages()) == 1


class PartlySlowDns(DnsServer):
    """Answers names under ``slow.test`` only after 2.5 seconds, others at once."""

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        name = str(dns.message.from_wire(data).question[0].name).lower()
        delay = 2.5 if name.endswith("slow.test.") else 0.0
        asyncio.get_running_loop().call_later(delay, self._answer, data, addr)

    def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            DnsServer.datagram_received(self, data, addr)


async def _partly_slow_dns() -> tuple[DnsServer, int]:
    """A name server for spoofed.test (p=reject, answered at once) and
    slow.test (p=none), whose names under slow.test answer after 2.5 s."""
    records = {
        ("spoofed.test", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"'],
        ("_dmarc.spoofed.test", "TXT"): ['"v=DMARC1; p=reject"'],
        ("slow.test", "TXT"): ['"v=spf1 -all"'],
        ("_dmarc.slow.test", "TXT"): ['"v=DMARC1; p=none"'],
    }
    server, port = await start_dns(records)
    server.__class__ = PartlySlowDns
    return server, port


async def test_slow_dns_for_many_messages_does_not_switch_dmarc_off_for_others(
    gateway_factory: GatewayFactory,
) -> None:
    """Twelve messages whose domains' name servers answer slowly are checked at
    the same time; a forged message meanwhile, from a domain that publishes
    p=reject and answers at once, is still refused. (The checks ran on the
    event loop's default executor, six threads here: the forged one waited
    behind the slow ones until its budget ran out, and a check that times out
    is a temperror, which does not enforce DMARC.)"""
    server, port = await _partly_slow_dns()
    gw = await gateway_factory(
        gateway={"dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout": 3}},
        sender_auth={"timeout": 4},
    )
    loop = asyncio.get_running_loop()
    try:
        with ThreadPoolExecutor(13) as clients:  # not the gateway's executor
            slow = [
                loop.run_in_executor(
                    clients, send, gw.port, "127.0.0.1", f"u{n}@slow.test", message("x@slow.test")
                )
                for n in range(12)
            ]
            await asyncio.sleep(0.5)  # the slow ones are being checked
            forged = message("ceo@spoofed.test")
            code, text = await loop.run_in_executor(
                clients, send, gw.port, "127.0.0.1", "ceo@spoofed.test", forged
            )
            await asyncio.gather(*slow)
    finally:
        assert server.transport is not None
        server.transport.close()
    assert code == 550, text
    assert b"DMARC" in text


async def test_when_every_check_thread_waits_on_dns_a_message_is_deferred_not_taken_unchecked(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks' pool, cut here to two threads, kept busy by messages whose
    name servers are slow: a forged message behind them waits at most the
    check's budget for a thread, then gets 451 4.7.0 where DMARC is enforced
    (never 250 unchecked: a flood of slow domains must not open the door to
    forgeries), and is accepted unchecked where the profile only reports."""
    monkeypatch.setattr(senderauth, "POOL", Pool("senderauth", 2))
    server, port = await _partly_slow_dns()
    gw = await gateway_factory(
        gateway={"dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout": 3}},
        sender_auth={"timeout": 4},
        connection_profiles=[
            {"name": "lenient", "client_hosts": ["127.0.0.9"], "dmarc_policy": "report"}
        ],
    )
    loop = asyncio.get_running_loop()
    forged = message("ceo@spoofed.test")

    def slow(clients: ThreadPoolExecutor, n: int) -> asyncio.Future[tuple[int, bytes]]:
        sender = f"x@s{n}.slow.test"  # a domain each: nothing comes from the DNS cache
        return loop.run_in_executor(clients, send, gw.port, "127.0.0.1", sender, message(sender))

    try:
        with ThreadPoolExecutor(8) as clients:  # not the gateway's threads
            # two checks take both threads for the budget (4 s); two more queue at
            # 1 s and take them at 4 s, before their own wait ends at 5 s
            waves = [slow(clients, 0), slow(clients, 1)]
            await asyncio.sleep(1)
            waves += [slow(clients, 2), slow(clients, 3)]
            await asyncio.sleep(0.5)
            started = loop.time()
            enforced, reported = await asyncio.gather(
                loop.run_in_executor(clients, send, gw.port, "127.0.0.1", "c@spoofed.test", forged),
                loop.run_in_executor(clients, send, gw.port, "127.0.0.9", "c@spoofed.test", forged),
            )
            waited = loop.time() - started
            await asyncio.gather(*waves)
    finally:
        assert server.transport is not None
        server.transport.close()
    assert enforced[0] == 451, enforced
    assert b"4.7.0" in enforced[1]
    assert reported[0] == 250, reported
    assert waited < 6.5  # the budget (4 s), not the queue ahead of it (until 8 s)
