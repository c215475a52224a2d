"""DANE (RFC 7672) end to end: the test DNS server answers for example.com with the
AD bit set (as a local validating resolver would; the gateway trusts the AD bit
of its configured resolver), publishing the MX and the TLSA records of the next
hop, a real gateway with a STARTTLS listener and a trustme certificate."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import capture_logs

from tests.conftest import Certs, GatewayFactory, SinkHandle
from tests.dnsserver import DnsServer
from tests.integration.outbound_security import (
    issue,
    send,
    spki_sha256,
    start_dns_for,
    start_pair,
    wait_state,
)

SECURE = ("example.com",)


@pytest.fixture
async def secure_dns() -> AsyncIterator[tuple[DnsServer, int]]:
    dns, port = await start_dns_for({}, secure=SECURE)
    yield dns, port
    assert dns.transport is not None
    dns.transport.close()


def _tlsa(dns: DnsServer, port: int, *records: str) -> None:
    dns.records[f"_{port}._tcp.mx.example.com.", "TLSA"] = list(records)


async def _deliveries(
    factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    dns: tuple[DnsServer, int],
    hop_cert: tuple[Path, Path],
    tlsa: list[str] | None,
    **outbound: object,
) -> tuple[int, Path]:
    """Start the hop and the sender; publish ``tlsa`` (``{spki}``: the hop's key)."""
    hop, sender, data_dir = await start_pair(
        factory, sink, certs, tmp_path, dns[1], hop_cert, {"dane": True, **outbound}
    )
    if tlsa is not None:
        spki = spki_sha256(hop_cert[0])
        _tlsa(dns[0], hop.port, *(r.format(spki=spki) for r in tlsa))
    return sender.port, data_dir


def _delivery_line(logs: list[MutableMapping[str, Any]]) -> MutableMapping[str, Any]:
    [line] = [e for e in logs if e["event"] == "delivery" and e["connector"] == "mx"]
    return line


async def test_a_matching_dane_ee_record_delivers_with_verified_dane(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    secure_dns: tuple[DnsServer, int],
) -> None:
    # DANE-EE ignores names: the certificate is for some other name altogether
    hop_cert = issue(certs.ca, tmp_path, "unrelated.example.net")
    port, _ = await _deliveries(
        gateway_factory, sink, certs, tmp_path, secure_dns, hop_cert, ["3 1 1 {spki}"]
    )
    with capture_logs() as logs:
        await asyncio.to_thread(send, port)
        [(_, body)] = await sink.wait_for(1)
    assert body.count(b"with ESMTPS") == 1
    line = _delivery_line(logs)
    assert (line["state"], line["verified"]) == ("delivered", "dane")


async def test_a_tlsa_mismatch_defers_and_sends_nothing(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    secure_dns: tuple[DnsServer, int],
) -> None:
    hop_cert = issue(certs.ca, tmp_path, "mx.example.com")  # WebPKI-valid: no help
    port, data_dir = await _deliveries(
        gateway_factory, sink, certs, tmp_path, secure_dns, hop_cert, ["3 1 1 " + "ab" * 32]
    )
    await asyncio.to_thread(send, port)
    state, reply = await wait_state(data_dir, "deferred")
    assert state == "deferred"
    assert reply.startswith("4.7.5 DANE: no TLSA record matches")
    await asyncio.sleep(0.5)
    assert sink.messages() == []


async def test_dane_takes_precedence_over_mta_sts(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    secure_dns: tuple[DnsServer, int],
) -> None:
    """MTA-STS enforce alone would defer (the certificate is not for the MX host)."""
    hop_cert = issue(certs.ca, tmp_path, "unrelated.example.net")
    port, _ = await _deliveries(
        gateway_factory,
        sink,
        certs,
        tmp_path,
        secure_dns,
        hop_cert,
        ["3 1 1 {spki}"],
        domains=[{"domain": "example.com", "mta_sts": "enforce"}],
    )
    with capture_logs() as logs:
        await asyncio.to_thread(send, port)
        assert len(await sink.wait_for(1)) == 1
    assert _delivery_line(logs)["verified"] == "dane"


async def test_tlsa_records_without_the_ad_bit_are_not_used(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    secure_dns: tuple[DnsServer, int],
) -> None:
    secure_dns[0].secure = ()  # the resolver did not validate: no DANE, opportunistic TLS
    hop_cert = issue(certs.ca, tmp_path, "mx.example.com")
    port, _ = await _deliveries(
        gateway_factory, sink, certs, tmp_path, secure_dns, hop_cert, ["3 1 1 " + "ab" * 32]
    )
    with capture_logs() as logs:
        await asyncio.to_thread(send, port)
        assert len(await sink.wait_for(1)) == 1
    assert _delivery_line(logs)["verified"] is False


async def test_dane_ta_checks_the_chain_and_the_name(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    secure_dns: tuple[DnsServer, int],
) -> None:
    """DANE-TA 2 0 1: the trust anchor is the CA the server sends in its chain."""
    ca_der = x509.load_pem_x509_certificate(certs.ca.cert_pem.bytes()).public_bytes(Encoding.DER)
    cert, key = issue(certs.ca, tmp_path, "mx.example.com")
    with cert.open("ab") as chain:
        chain.write(certs.ca.cert_pem.bytes())  # the server presents its anchor
    port, _ = await _deliveries(
        gateway_factory,
        sink,
        certs,
        tmp_path,
        secure_dns,
        (cert, key),
        [f"2 0 1 {hashlib.sha256(ca_der).hexdigest()}"],
    )
    with capture_logs() as logs:
        await asyncio.to_thread(send, port)
        assert len(await sink.wait_for(1)) == 1
    assert _delivery_line(logs)["verified"] == "dane"


async def test_dane_ta_with_a_certificate_for_another_name_defers(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    secure_dns: tuple[DnsServer, int],
) -> None:
    ca_der = x509.load_pem_x509_certificate(certs.ca.cert_pem.bytes()).public_bytes(Encoding.DER)
    cert, key = issue(certs.ca, tmp_path, "other.example.net")
    with cert.open("ab") as chain:
        chain.write(certs.ca.cert_pem.bytes())
    port, data_dir = await _deliveries(
        gateway_factory,
        sink,
        certs,
        tmp_path,
        secure_dns,
        (cert, key),
        [f"2 0 1 {hashlib.sha256(ca_der).hexdigest()}"],
    )
    await asyncio.to_thread(send, port)
    state, reply = await wait_state(data_dir, "deferred")
    assert state == "deferred"
    assert "is not issued to mx.example.com (DANE-TA)" in reply


async def test_a_server_without_starttls_is_never_used_in_plaintext(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    secure_dns: tuple[DnsServer, int],
) -> None:
    """The MX is the sink itself, which offers no STARTTLS; its TLSA says TLS."""
    dns, dns_port = secure_dns
    sender = await gateway_factory(
        spoof_detection=False,
        gateway={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
        outbound_security={"dane": True},
        send_connectors=[
            {"name": "mx", "security": "starttls", "deliver": {"dns": {"port": sink.port}}}
        ],
    )
    _tlsa(dns, sink.port, "3 1 1 " + "ab" * 32)
    await asyncio.to_thread(send, sender.port)
    state, reply = await wait_state(tmp_path / "gw0", "deferred")
    assert state == "deferred"
    assert "4.7.5 mx.example.com offers no STARTTLS, and DANE requires TLS" in reply
    assert sink.messages() == []
