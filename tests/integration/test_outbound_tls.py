"""Outbound TLS policy against a real STARTTLS smarthost (a second gateway)."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path
from typing import Any

import pytest

from smtpgate.queue.store import Filters, QueueStore
from tests.conftest import Certs, GatewayFactory, SinkHandle

# `smtpgate serve` runs on uvloop, whose closed transports raise on write: both loops.
pytestmark = pytest.mark.both_loops


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("bob@example.org", ["alice@example.com"], b"Subject: t\r\n\r\nx\r\n")


async def _smarthost(factory: GatewayFactory, certs: Certs, **tls: Any) -> int:
    gw = await factory(
        spoof_detection=False,
        listeners=[
            {"name": "mx", "address": "127.0.0.1:0", "security": "starttls", "certificate": "gw"}
        ],
        certificates=[{"name": "gw", "cert": str(certs.cert_file), "key": str(certs.key_file)}],
        **({"tls": tls} if tls else {}),
    )
    return gw.port


async def _sender(
    factory: GatewayFactory,
    smarthost: int,
    outbound: dict[str, Any],
    security: str = "starttls",
    **extra: Any,
) -> int:
    gw = await factory(
        spoof_detection=False,
        connection_profiles=[
            {"name": "next-hop", "client_hosts": ["127.0.0.1"], "outbound_tls": outbound}
        ],
        send_connectors=[
            {
                "name": "hop",
                "security": security,
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": smarthost}},
            }
        ],
        **extra,
    )
    return gw.port


def _last_reply(tmp_path: Path, index: int) -> tuple[str, str]:
    store = QueueStore(tmp_path / f"gw{index}" / "queue")
    try:
        [message] = list(store.list(Filters()))
    finally:
        store.close()
    return message.recipients[0].state, message.recipients[0].last_reply or ""


async def test_validation_with_a_mismatching_name_defers(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs, tmp_path: Path
) -> None:
    hop = await _smarthost(gateway_factory, certs)
    port = await _sender(
        gateway_factory,
        hop,
        {"validate_certificate": True, "match": ["recipient_domain"]},
        tls={"ca_files": [str(certs.ca_file)]},
    )
    await asyncio.to_thread(_send, port)
    await asyncio.sleep(1)
    state, reply = _last_reply(tmp_path, 1)
    assert state == "deferred"
    assert "4.7.5 the certificate of 127.0.0.1 does not match example.com" in reply
    assert sink.messages() == []


async def test_validation_with_the_right_name_delivers(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs
) -> None:
    hop = await _smarthost(gateway_factory, certs)
    port = await _sender(
        gateway_factory,
        hop,
        {"mandatory": True, "validate_certificate": True, "match": ["gw.test"]},
        tls={"ca_files": [str(certs.ca_file)]},
    )
    await asyncio.to_thread(_send, port)
    [(_, body)] = await sink.wait_for(1)
    assert body.count(b"with ESMTPS") == 1  # the hop between the two gateways was TLS


async def test_mandatory_tls_never_falls_back_to_plaintext(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    port = await _sender(gateway_factory, sink.port, {"mandatory": True})  # the sink has no TLS
    await asyncio.to_thread(_send, port)
    await asyncio.sleep(1)
    state, reply = _last_reply(tmp_path, 0)
    assert state == "deferred"
    assert "4.7.5 127.0.0.1 offers no STARTTLS, and TLS is mandatory" in reply
    assert sink.messages() == []


async def test_opportunistic_tls_failure_retries_without_tls(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs
) -> None:
    hop = await _smarthost(gateway_factory, certs, protocols=["TLSv1.2"])
    port = await _sender(gateway_factory, hop, {"protocols": ["TLSv1.3"]})  # no common version
    await asyncio.to_thread(_send, port)
    [(_, body)] = await sink.wait_for(1)
    assert b"with ESMTP id" in body
    assert b"with ESMTPS" not in body  # after the failed handshake, every hop was plain


def _recipient(tmp_path: Path, index: int) -> tuple[str, str, int]:
    store = QueueStore(tmp_path / f"gw{index}" / "queue")
    try:
        [message] = list(store.list(Filters()))
    finally:
        store.close()
    r = message.recipients[0]
    return r.state, r.last_reply or "", r.attempts


async def test_mandatory_tls_without_a_common_version_defers_once_and_backs_off(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs, tmp_path: Path
) -> None:
    """A failed handshake is a failed attempt: 4.7.5, counted, backed off, never plaintext.

    The first version raised out of the attempt (writing QUIT on the transport the
    failed handshake had closed) and the queue retried it in a busy loop, counting
    nothing."""
    hop = await _smarthost(gateway_factory, certs, protocols=["TLSv1.2"])
    port = await _sender(
        gateway_factory,
        hop,
        {"mandatory": True, "protocols": ["TLSv1.3"]},
        queue={"retry": {"first": 60, "max_backoff": 600}},
    )
    await asyncio.to_thread(_send, port)
    await asyncio.sleep(1.5)  # the sender's queue would have looped hundreds of times
    state, reply, attempts = _recipient(tmp_path, 1)
    assert (state, attempts) == ("deferred", 1)
    assert "4.7.5 TLS with 127.0.0.1 failed" in reply
    assert sink.messages() == []


async def test_a_kept_connection_never_carries_mail_its_certificate_was_not_checked_for(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs, tmp_path: Path
) -> None:
    """The hop's certificate names localhost, not example.com. A connection kept after
    delivering to alice@localhost (checked against "localhost") must not carry the
    next message to example.com, whose check would fail: a fresh one is opened and
    its certificate refused."""
    domains = ["example.com", "localhost"]
    hop = await gateway_factory(
        spoof_detection=False,
        hosted_domains=domains,
        listeners=[
            {"name": "mx", "address": "127.0.0.1:0", "security": "starttls", "certificate": "gw"}
        ],
        certificates=[{"name": "gw", "cert": str(certs.cert_file), "key": str(certs.key_file)}],
        send_connectors=[
            {
                "name": "to-sink",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
                "security": "none",
            }
        ],
    )
    port = await _sender(
        gateway_factory,
        hop.port,
        {"mandatory": True, "validate_certificate": True, "match": ["recipient_domain"]},
        tls={"ca_files": [str(certs.ca_file)]},
        hosted_domains=domains,
        queue={"connection_cache_time": 30},
    )

    def send(to: str) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("bob@example.org", [to], b"Subject: t\r\n\r\nx\r\n")

    await asyncio.to_thread(send, "alice@localhost")
    await sink.wait_for(1)
    await asyncio.to_thread(send, "alice@example.com")
    for _ in range(50):
        states = [_recipient_state(tmp_path, "alice@example.com")]
        if states[0] == "deferred":
            break
        await asyncio.sleep(0.1)
    assert states == ["deferred"]
    assert len(sink.messages()) == 1  # only the message to localhost went out


def _recipient_state(tmp_path: Path, address: str) -> str | None:
    store = QueueStore(tmp_path / "gw1" / "queue")
    try:
        for message in store.list(Filters()):
            for recipient in message.recipients:
                if recipient.address == address:
                    return str(recipient.state)
    finally:
        store.close()
    return None
