"""``/metrics``: scraped around real traffic through a real ``smtpgate serve``,
the counters move by what the traffic did, and an apply keeps them."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpgate.proto.replies import Reply
from tests.conftest import SinkHandle
from tests.integration.conftest import make_token
from tests.integration.observing import Served, send, serve, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def served(tmp_path: Path, sink: SinkHandle) -> AsyncIterator[Served]:
    sink.behaviour.refuse["bounce@example.com"] = Reply.of(550, "5.1.1", "no such user here")
    handle = serve(tmp_path, sink.port)
    yield handle
    handle.stop()


async def scrape(served: Served, **kwargs: object) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{served.api_port}/metrics", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_counters_move_with_the_traffic_and_survive_an_apply(served: Served) -> None:
    before = await wait_until_scraped(served)
    await asyncio.to_thread(send, served.port, "a@outside.test", ["bob@example.com"], "<m1@x>")
    await asyncio.to_thread(send, served.port, "a@outside.test", ["bounce@example.com"], "<m2@x>")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(send, served.port, "a@outside.test", ["x@elsewhere.test"], "<m3>")

    def bounced(samples: Samples) -> float:
        return value(
            samples, "smtpgate_delivery_attempts_total", connector="to-sink", status="bounced"
        )

    async def moved() -> Samples | None:
        now = await scrape(served)
        return now if bounced(now) - bounced(before) >= 1 else None

    after = None
    for _ in range(100):
        after = await moved()
        if after:
            break
        await asyncio.sleep(0.2)
    assert after is not None, "the bounce never showed in /metrics"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("smtpgate_messages_accepted_total", listener="mx", profile="default") == 2
    assert delta("smtpgate_connections_total", listener="mx", profile="default") == 3
    assert delta("smtpgate_refusals_total", stage="RCPT", code="5.7.1") == 1
    assert delta("smtpgate_smtp_replies_total", code_class="5xx", enhanced="5.7.1") == 1
    assert delta("smtpgate_delivery_attempts_total", connector="to-sink", status="sent") == 1
    assert delta("smtpgate_delivery_attempts_total", connector="to-sink", status="bounced") == 1
    assert delta("smtpgate_delivery_delay_seconds_count", connector="to-sink") == 1
    assert delta("smtpgate_tls_total", direction="inbound", version="none", cipher="none") == 2
    assert delta("smtpgate_reports_total", action="failed") == 1
    assert delta("smtpgate_scanner_verdicts_total", scanner="dmarc", action="accept") == 2
    assert delta("smtpgate_messages_accepted_bytes_total") > 300
    assert value(after, "smtpgate_running_revision") == 1
    assert value(after, "smtpgate_sessions", listener="mx") == 0

    # an apply (revision 2) keeps every counter
    token = await asyncio.to_thread(make_token, served.config)
    api = f"http://127.0.0.1:{served.api_port}/api/v1"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client:
        added = await client.post(f"{api}/config/draft/hosted_domains", json={"value": "x.test"})
        assert added.status_code < 300, added.text
        applied = await client.post(f"{api}/config/apply", json={"comment": "metrics"})
        assert applied.status_code < 300, applied.text

    async def revision_2() -> Samples | None:
        now = await scrape(served)
        return now if value(now, "smtpgate_running_revision") == 2 else None

    later = None
    for _ in range(50):
        later = await revision_2()
        if later:
            break
        await asyncio.sleep(0.2)
    assert later is not None
    for name, labels in (
        ("smtpgate_messages_accepted_total", {"listener": "mx", "profile": "default"}),
        ("smtpgate_delivery_attempts_total", {"connector": "to-sink", "status": "sent"}),
    ):
        assert value(later, name, **labels) == value(after, name, **labels)


async def wait_until_scraped(served: Served) -> Samples:
    """Metrics written after now: the start-up (and its port probe) is in them."""
    since = time.time()
    for _ in range(100):
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{served.api_port}/metrics")
        if response.status_code == 200:
            found = parse(response.text)
            if value(found, "smtpgate_metrics_timestamp_seconds") >= since:
                return found
        await asyncio.sleep(0.2)
    raise AssertionError("no fresh metrics")


def _public_address() -> str | None:
    import socket  # noqa: PLC0415

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: the route's source address
            address = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") else address


async def test_off_loopback_metrics_need_a_token(tmp_path: Path, sink: SinkHandle) -> None:
    address = _public_address()
    if address is None:
        pytest.skip("this host has no address besides loopback")
    handle = serve(tmp_path, sink.port, admin={"listen": "0.0.0.0:0"})
    try:
        url = f"http://{address}:{handle.api_port}"
        assert await wait_until((handle.data_dir / "metrics.prom").exists)
        async with httpx.AsyncClient() as client:
            refused = await client.get(f"{url}/metrics")
            assert refused.status_code == 401
            assert (await client.get(f"{url}/healthz")).status_code == 200
            token = await asyncio.to_thread(make_token, handle.config)
            headers = {"Authorization": f"Bearer {token}"}
            allowed = await client.get(f"{url}/metrics", headers=headers)
            assert allowed.status_code == 200
            assert (
                "smtpgate_connections_total" in allowed.text or "smtpgate_sessions" in allowed.text
            )
    finally:
        handle.stop()
