"""MTA-STS (RFC 8461) end to end: a real DNS server publishing ``_mta-sts``, a real
HTTPS server with a trustme certificate serving the policy, a next hop that
presents a certificate that matches its MX name or does not, and the sink."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from smtpgate.config.schema import DnsSettings
from smtpgate.delivery.mtasts import StsCache
from smtpgate.delivery.tlsrpt import SessionRecorder, utc_day
from smtpgate.dns import DnsResolver
from smtpgate.queue.store import Filters, QueueStore
from tests.conftest import Certs, GatewayFactory, SinkHandle
from tests.dnsserver import DnsServer
from tests.integration.outbound_security import (
    POLICY_PATH,
    Https,
    issue,
    policy_response,
    policy_text,
    send,
    start_dns_for,
    start_https,
    start_pair,
    wait_state,
)

STS_RECORD = {
    ("_mta-sts.example.com", "TXT"): ['"v=STSv1; id=20261129T1"'],
    ("mta-sts.example.com", "A"): ["127.0.0.1"],
}


@dataclass
class World:
    dns: DnsServer
    dns_port: int
    https: Https
    certs: Certs
    directory: Path


@pytest.fixture
async def world(certs: Certs, tmp_path: Path) -> AsyncIterator[World]:
    directory = tmp_path / "certs"
    directory.mkdir()
    cert, key = issue(certs.ca, directory, "mta-sts.example.com", "127.0.0.1")
    https = await start_https(cert, key, {})
    dns, port = await start_dns_for(STS_RECORD)
    yield World(dns, port, https, certs, directory)
    https.close()
    assert dns.transport is not None
    dns.transport.close()


async def _pair(
    world: World,
    factory: GatewayFactory,
    sink: SinkHandle,
    tmp_path: Path,
    *,
    hop_names: tuple[str, ...],
    **outbound: Any,
) -> tuple[int, Path]:
    hop_cert = issue(world.certs.ca, world.directory, *hop_names)
    settings = {"mta_sts_port": world.https.port, **outbound}
    _, sender, data_dir = await start_pair(
        factory, sink, world.certs, tmp_path, world.dns_port, hop_cert, settings
    )
    return sender.port, data_dir


async def test_enforce_with_a_matching_mx_delivers_and_says_so(
    world: World, gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    world.https.responses[POLICY_PATH] = policy_response(policy_text("enforce", "mx.example.com"))
    port, data_dir = await _pair(
        world, gateway_factory, sink, tmp_path, hop_names=("mx.example.com",)
    )
    with capture_logs() as logs:
        await asyncio.to_thread(send, port)
        [(_, body)] = await sink.wait_for(1)
    assert body.count(b"with ESMTPS") == 1  # the hop from the sender to the MX
    [line] = [e for e in logs if e["event"] == "delivery" and e["connector"] == "mx"]
    assert (line["state"], line["verified"]) == ("delivered", "mta-sts")
    [(method, path, headers, _)] = world.https.requests
    assert (method, path, headers["host"]) == ("GET", POLICY_PATH, "mta-sts.example.com")
    saved = data_dir / "mta-sts" / "example.com.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["id"] == "20261129T1"


async def test_enforce_with_an_mx_outside_the_policy_defers_and_sends_nothing(
    world: World, gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    world.https.responses[POLICY_PATH] = policy_response(
        policy_text("enforce", "*.mail.example.com")
    )
    port, data_dir = await _pair(
        world, gateway_factory, sink, tmp_path, hop_names=("mx.example.com",)
    )
    await asyncio.to_thread(send, port)
    state, reply = await wait_state(data_dir, "deferred")
    assert state == "deferred"
    assert "4.7.5 mx.example.com is not in the MTA-STS policy of example.com" in reply
    await asyncio.sleep(0.5)
    assert sink.messages() == []


async def test_enforce_with_a_certificate_for_another_name_defers(
    world: World, gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    world.https.responses[POLICY_PATH] = policy_response(policy_text("enforce", "mx.example.com"))
    port, data_dir = await _pair(
        world, gateway_factory, sink, tmp_path, hop_names=("other.example.net",)
    )
    await asyncio.to_thread(send, port)
    state, reply = await wait_state(data_dir, "deferred")
    assert state == "deferred"
    assert reply.startswith("4.7.5")
    assert "mx.example.com" in reply
    await asyncio.sleep(0.5)
    assert sink.messages() == []


async def test_testing_delivers_and_records_the_failure(
    world: World, gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    world.https.responses[POLICY_PATH] = policy_response(policy_text("testing", "mx.example.com"))
    port, data_dir = await _pair(
        world,
        gateway_factory,
        sink,
        tmp_path,
        hop_names=("other.example.net",),
        tlsrpt={"enabled": True},
    )
    await asyncio.to_thread(send, port)
    [(_, body)] = await sink.wait_for(1)
    assert body.count(b"with ESMTPS") == 1  # delivered over (unauthenticated) TLS
    recorder = SessionRecorder(data_dir / "tlsrpt.db")
    try:
        [row] = recorder.rows(utc_day(), "example.com")
    finally:
        recorder.close()
    assert (row["policy_type"], row["result"], row["count"]) == (
        "sts",
        "certificate-host-mismatch",
        1,
    )
    assert row["receiving_mx"] == "mx.example.com"


async def test_an_override_to_none_ignores_the_published_policy(
    world: World, gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    world.https.responses[POLICY_PATH] = policy_response(policy_text("enforce", "mx.example.com"))
    port, _ = await _pair(
        world,
        gateway_factory,
        sink,
        tmp_path,
        hop_names=("other.example.net",),
        domains=[{"domain": "example.com", "mta_sts": "none"}],
    )
    await asyncio.to_thread(send, port)
    assert len(await sink.wait_for(1)) == 1


async def test_an_override_to_enforce_without_a_policy_needs_a_valid_certificate(
    world: World, gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    del world.dns.records["_mta-sts.example.com.", "TXT"]  # nothing published
    port, data_dir = await _pair(
        world,
        gateway_factory,
        sink,
        tmp_path,
        hop_names=("other.example.net",),
        domains=[{"domain": "example.com", "mta_sts": "enforce"}],
    )
    await asyncio.to_thread(send, port)
    state, reply = await wait_state(data_dir, "deferred")
    assert (state, reply[:5]) == ("deferred", "4.7.5")
    assert world.https.requests == []


async def test_a_cached_connection_never_carries_mail_an_enforce_policy_protects(
    world: World, gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    """The same MX serves a domain without a policy first: its connection, kept for
    reuse, was never checked against example.com's policy and must not be used."""
    world.https.responses[POLICY_PATH] = policy_response(policy_text("enforce", "mx.example.com"))
    world.dns.records["plain.example.", "MX"] = ["10 mx.example.com."]
    hop_cert = issue(world.certs.ca, world.directory, "other.example.net")
    hop = {
        "hosted_domains": ["example.com", "example.org", "plain.example"],
        "send_connectors": [
            {
                "name": "to-sink",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
            }
        ],
    }
    _, sender, data_dir = await start_pair(
        gateway_factory, sink, world.certs, tmp_path, world.dns_port, hop_cert,
        {"mta_sts_port": world.https.port}, hop_extra=hop,
        mx_domains=("example.com", "plain.example"),
        queue={"connection_cache_time": 30}, hosted_domains=hop["hosted_domains"],
    )  # fmt: skip
    await asyncio.to_thread(send, sender.port, "bob@plain.example")
    assert len(await sink.wait_for(1)) == 1
    await asyncio.to_thread(send, sender.port, "alice@example.com")
    await asyncio.sleep(1)
    assert len(sink.messages()) == 1
    store = QueueStore(data_dir / "queue")
    try:
        [waiting] = [m for m in store.list(Filters()) if m.recipients[0].state == "deferred"]
    finally:
        store.close()
    assert (waiting.recipients[0].last_reply or "").startswith("4.7.5")


# -- the fetch and the cache, against the same real servers -------------------------------


def _cache(world: World, tmp_path: Path) -> StsCache:
    resolver = DnsResolver(DnsSettings(nameservers=["127.0.0.1"], port=world.dns_port, timeout=2))
    return StsCache(
        resolver,
        tmp_path / "sts",
        port=world.https.port,
        ca_files=(str(world.certs.ca_file),),
    )


async def test_a_policy_is_fetched_once_per_id_and_kept_on_disk(
    world: World, tmp_path: Path
) -> None:
    world.https.responses[POLICY_PATH] = policy_response(policy_text("enforce", "mx.example.com"))
    cache = _cache(world, tmp_path)
    first, _ = await cache.lookup("example.com")
    again, _ = await _cache(world, tmp_path).lookup("example.com")  # a restart: from disk
    assert first is not None
    assert again == first
    assert len(world.https.requests) == 1
    world.dns.records["_mta-sts.example.com.", "TXT"] = ['"v=STSv1; id=2"']  # a new id
    changed, _ = await cache.lookup("example.com")
    assert changed is not None
    assert changed.id == "2"
    assert len(world.https.requests) == 2
    del world.dns.records["_mta-sts.example.com.", "TXT"]
    kept, error = await cache.lookup("example.com")  # record gone: the cached policy stays
    assert (kept, error) == (changed, None)


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        ((301, {"Location": "https://elsewhere.example/"}, b""), "sts-policy-fetch-error"),
        ((404, {}, b"no"), "sts-policy-fetch-error"),
        ((200, {"Content-Type": "text/html"}, b"version: STSv1"), "sts-policy-invalid"),
        (policy_response(b"version: STSv1\nmode: enforce\nmax_age: 1\n"), "sts-policy-invalid"),
        (policy_response(b"x" * (64 * 1024 + 1)), "sts-policy-invalid"),
    ],
    ids=["redirect-not-followed", "404", "not-text-plain", "no-mx", "over-64KiB"],
)
async def test_an_unusable_policy_is_no_policy_and_says_why(
    world: World, tmp_path: Path, response: tuple[int, dict[str, str], bytes], kind: str
) -> None:
    world.https.responses[POLICY_PATH] = response
    found, error = await _cache(world, tmp_path).lookup("example.com")
    assert (found, error) == (None, kind)
    assert len(world.https.requests) == 1  # one request: no redirect was followed


async def test_a_policy_host_without_a_trusted_certificate_is_refused(
    world: World, tmp_path: Path
) -> None:
    world.https.responses[POLICY_PATH] = policy_response(policy_text("enforce", "mx.example.com"))
    cache = _cache(world, tmp_path)
    cache.ca_files = ()  # the trustme CA is not trusted now
    found, error = await cache.lookup("example.com")
    assert (found, error) == (None, "sts-webpki-invalid")
