"""The queue and send connectors with real sinks: retries, bounces, cost, failover.

The client hears 250 once the message is durable; what happens next is the
queue's business, and these tests watch it happen at real SMTP sinks.
"""

from __future__ import annotations

import asyncio
import email
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpgate.delivery.verify import verify_connector
from smtpgate.inbound.contract import SessionInfo
from smtpgate.model.envelope import Envelope
from smtpgate.proto.replies import Reply
from smtpgate.queue.store import Filters, QueueStore
from smtpgate.sink import SinkBehaviour, SinkHandler, build_sink, parse_reply
from smtpgate.spool import SpooledBody
from tests.clock import (
    FakeClock,
    advance,
    attempts_are,
    empty,
    states_are,
    use_clock,
    wait_queue,
)
from tests.conftest import GatewayFactory, GatewayHandle, SinkHandle, free_port, start_sink
from tests.dnsserver import start_dns

NO_SPOOF = {"spoof_detection": False}  # tests send as bob@example.org from a default client


def _send(
    port: int, to: list[str], sender: str = "bob@example.org", *, dsn: bool = False
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        options = (
            (["RET=HDRS", "ENVID=env-42"], ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;orig@x.example"])
            if dsn
            else ([], [])
        )
        return client.sendmail(
            sender,
            to,
            b"Subject: t\r\nMessage-ID: <m1@x>\r\n\r\nbody\r\n",
            mail_options=options[0],
            rcpt_options=options[1],
        )


@pytest.fixture
async def second_sink(tmp_path: Path) -> AsyncIterator[SinkHandle]:
    handle = await start_sink(tmp_path / "sink2")
    yield handle
    await handle.server.stop(1)


def _connector(name: str, port: int, cost: int = 10, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "security": "none",
        "cost": cost,
        "deliver": {"smarthost": {"host": "127.0.0.1", "port": port}},
        **extra,
    }


async def test_a_4xx_then_250_is_retried_and_delivered_once(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    gw = await gateway_factory(**NO_SPOOF)  # retry.first: 0.5 s
    clock = FakeClock()
    use_clock(gw.gateway, clock)
    sink.behaviour.data_replies.append(parse_reply("451 4.3.0 mailbox busy"))
    assert await asyncio.to_thread(_send, gw.port, ["alice@example.com"]) == {}
    await wait_queue(gw.gateway, attempts_are(("deferred", 1)))
    assert sink.messages() == []
    advance(gw.gateway, clock, 0.5)
    await wait_queue(gw.gateway, empty)  # delivered, and gone: no second delivery can come
    assert len(sink.messages()) == 1


async def test_a_5xx_bounces_to_the_sender_and_no_dearer_connector_is_tried(
    gateway_factory: GatewayFactory, sink: SinkHandle, second_sink: SinkHandle
) -> None:
    sink.behaviour.refuse["alice@example.com"] = parse_reply("550 5.1.1 no such user")
    gw = await gateway_factory(
        **NO_SPOOF,
        send_connectors=[
            _connector("cheap", sink.port, 5),
            _connector("dear", second_sink.port, 50),
        ],
    )
    assert await asyncio.to_thread(_send, gw.port, ["alice@example.com"], dsn=True) == {}
    [(meta, body)] = await sink.wait_for(1)
    assert meta["sender"] == ""
    assert meta["recipients"] == ["bob@example.org"]
    report = email.message_from_bytes(body)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = body.decode()
    assert "Final-Recipient: rfc822; alice@example.com" in status
    assert "Original-Recipient: rfc822; orig@x.example" in status
    assert "Original-Envelope-Id: env-42" in status
    assert "Action: failed" in status
    assert "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in status
    assert "Content-Type: text/rfc822-headers" in status  # RET=HDRS
    assert "Message-ID: <m1@x>" in status
    await wait_queue(gw.gateway, empty)  # nothing left that could still try the dear one
    assert second_sink.messages() == []


async def test_a_bounce_that_cannot_be_delivered_goes_to_the_administrator(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    sink.behaviour.refuse["alice@example.com"] = parse_reply("550 5.1.1 no such user")
    sink.behaviour.refuse["bob@example.org"] = parse_reply("550 5.1.1 no such sender")
    gw = await gateway_factory(**NO_SPOOF)
    await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
    [(meta, body)] = await sink.wait_for(1)
    assert meta["recipients"] == ["postmaster@example.com"]
    assert b"Final-Recipient: rfc822; bob@example.org" in body


async def test_null_sender_messages_are_never_bounced(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    sink.behaviour.refuse["alice@example.com"] = parse_reply("550 5.1.1 no such user")
    gw = await gateway_factory(**NO_SPOOF)
    await asyncio.to_thread(_send, gw.port, ["alice@example.com"], "")
    assert await sink.wait_for(1, timeout=2) == []


async def test_unreachable_smarthost_defers_and_the_message_waits_in_the_queue(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    dead = free_port()
    gw = await gateway_factory(**NO_SPOOF, send_connectors=[_connector("dead", dead)])
    assert await asyncio.to_thread(_send, gw.port, ["alice@example.com"]) == {}
    await wait_queue(gw.gateway, states_are("deferred"))
    store = QueueStore(tmp_path / "gw0" / "queue")
    try:
        [message] = list(store.list(Filters()))
        assert message.recipients[0].state == "deferred"
        assert "unreachable" in (message.recipients[0].last_reply or "")
    finally:
        store.close()


async def test_cheapest_connector_wins_and_failover_only_when_unreachable(
    gateway_factory: GatewayFactory, sink: SinkHandle, second_sink: SinkHandle
) -> None:
    dead = free_port()
    gw = await gateway_factory(
        **NO_SPOOF,
        send_connectors=[
            _connector("cheap-but-down", dead, 1, failover_when_unreachable=True),
            _connector("mid", second_sink.port, 5, namespaces=[{"recipient": "example.com"}]),
            _connector("dear", sink.port, 50),
        ],
    )
    await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
    [(meta, _)] = await second_sink.wait_for(1)
    assert meta["recipients"] == ["alice@example.com"]
    assert sink.messages() == []


async def test_no_connector_means_550_at_rcpt(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(send_connectors=[])
    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        await asyncio.to_thread(_send, gw.port, ["alice@example.com"], "a@elsewhere.example")
    assert caught.value.recipients["alice@example.com"][0] == 550


async def test_direct_delivery_by_mx_tries_the_next_mx_when_the_first_is_down(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    records = {
        ("example.com", "MX"): ["10 mx1.example.com.", "20 mx2.example.com."],
        ("mx1.example.com", "A"): ["127.0.0.9"],  # nothing listens there
        ("mx2.example.com", "A"): ["127.0.0.1"],
        ("example.org", "MX"): ["10 mx2.example.com."],
        ("nullmx.example", "MX"): ["0 ."],
    }
    dns_server, dns_port = await start_dns(records)
    try:
        gw = await gateway_factory(
            **NO_SPOOF,
            gateway={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
            hosted_domains=["example.com", "example.org", "nullmx.example", "missing.example"],
            send_connectors=[
                {"name": "mx", "security": "none", "deliver": {"dns": {"port": sink.port}}},
            ],
        )
        await asyncio.to_thread(
            _send, gw.port, ["alice@example.com", "x@nullmx.example", "y@missing.example"]
        )
        found = await sink.wait_for(2)
        recipients = sorted(r for meta, _ in found for r in meta["recipients"])
        assert recipients == ["alice@example.com", "bob@example.org"]  # the mail and one bounce
        bounce = next(body for meta, body in found if meta["sender"] == "").decode()
        assert "Final-Recipient: rfc822; x@nullmx.example" in bounce
        assert "Status: 5.1.10" in bounce
        assert "Final-Recipient: rfc822; y@missing.example" in bounce
        assert "Status: 5.1.2" in bounce
        assert ("mx1.example.com.", "A") in dns_server.queries
    finally:
        assert dns_server.transport is not None
        dns_server.transport.close()


async def test_fifty_mb_message_through_the_queue(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    gw = await gateway_factory(**NO_SPOOF, limits={"max_message_size": 60_000_000})
    body = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * (50_000_000 // 78)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=120) as client:
            client.sendmail("bob@example.org", ["alice@example.com"], body)

    await asyncio.to_thread(send)
    [(meta, stored)] = await sink.wait_for(1, timeout=60)
    assert meta["size"] > 50_000_000
    assert stored.endswith(body[-1000:])


async def test_gateway_handle_exposes_its_queue(gateway: GatewayHandle) -> None:
    counts = await gateway.gateway.queue.call(gateway.gateway.queue.store.counts)
    assert counts == {}


async def test_delivery_to_postfix_smtp_sink_with_pipelined_data(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    """smtp-sink offers PIPELINING but not CHUNKING: MAIL, RCPT and DATA go in one write."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        "smtp-sink",
        "-u",
        "postfix",
        "-c",
        f"127.0.0.1:{port}",
        "100",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.5)
        gw = await gateway_factory(**NO_SPOOF, send_connectors=[_connector("smtp-sink", port)])
        for _ in range(3):
            await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
        assert process.stdout is not None
        seen = b""
        async with asyncio.timeout(15):
            while b"mesg=3" not in seen:
                seen += await process.stdout.read(200)
    finally:
        process.terminate()
        await process.wait()


async def test_a_queue_that_cannot_persist_gives_451_never_250(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(**NO_SPOOF)
    queue = gw.gateway.queue
    await queue.call(queue.store.db.close)  # every later write fails
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
    assert caught.value.smtp_code == 451
    assert b"4.3.0" in caught.value.smtp_error


async def test_partial_acceptance_delivers_one_and_bounces_the_other(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    sink.behaviour.refuse["carol@example.com"] = parse_reply("550 5.1.1 no such user")
    gw = await gateway_factory(**NO_SPOOF)
    await asyncio.to_thread(_send, gw.port, ["alice@example.com", "carol@example.com"])
    found = await sink.wait_for(2)
    delivered = [meta for meta, _ in found if meta["sender"] == "bob@example.org"]
    bounces = [body for meta, body in found if meta["sender"] == ""]
    assert [m["recipients"] for m in delivered] == [["alice@example.com"]]
    assert len(bounces) == 1
    assert b"Final-Recipient: rfc822; carol@example.com" in bounces[0]
    assert (
        b"alice@example.com"
        not in bounces[0].split(b"message/delivery-status")[1].split(b"Content-Type:")[0]
    )


async def test_a_domain_without_mx_gets_mail_at_its_address_record(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    dns_server, dns_port = await start_dns({("example.com", "A"): ["127.0.0.1"]})
    try:
        gw = await gateway_factory(
            **NO_SPOOF,
            gateway={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
            send_connectors=[
                {"name": "mx", "security": "none", "deliver": {"dns": {"port": sink.port}}}
            ],
        )
        await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
        [(meta, _)] = await sink.wait_for(1)
        assert meta["recipients"] == ["alice@example.com"]
        assert ("example.com.", "MX") in dns_server.queries
    finally:
        assert dns_server.transport is not None
        dns_server.transport.close()


async def test_dsn_parameters_are_passed_to_a_next_hop_that_offers_dsn(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    gw = await gateway_factory(**NO_SPOOF)
    await asyncio.to_thread(_send, gw.port, ["alice@example.com"], dsn=True)
    [(meta, _)] = await sink.wait_for(1)
    assert meta["dsn"] == {
        "ret": "HDRS",
        "envid": "env-42",
        "recipients": [{"notify": ["DELAY", "FAILURE"], "orcpt": ["rfc822", "orig@x.example"]}],
    }


async def test_a_cached_connection_the_next_hop_closed_is_replaced_not_deferred(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """The next hop times the idle connection out (421 and close) while it sits in our
    cache; the next message must go over a fresh connection at once, not wait a retry."""
    behaviour = SinkBehaviour(tmp_path / "cache-sink", fsync=False)
    port = free_port()
    first = build_sink("127.0.0.1", port, behaviour)
    await first.start()
    gw = await gateway_factory(
        **NO_SPOOF,
        queue={"retry": {"first": 3600, "max_backoff": 3600}, "connection_cache_time": 60},
        send_connectors=[_connector("hop", port)],
    )
    await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
    handle = SinkHandle(port, behaviour.directory, behaviour, first)
    await handle.wait_for(1)
    await first.stop(1)  # idle sessions get "421 4.3.2" and are closed
    second = build_sink("127.0.0.1", port, behaviour)
    await second.start()
    try:
        await asyncio.to_thread(_send, gw.port, ["bob@example.com"])
        assert len(await handle.wait_for(2, timeout=5)) == 2  # a deferral would wait an hour
    finally:
        await second.stop(1)


class _SlowSink(SinkHandler):
    """A sink that takes its time over each message and notes how many it held at once."""

    active = 0
    most = 0

    async def on_message(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        _SlowSink.active += 1
        _SlowSink.most = max(_SlowSink.most, _SlowSink.active)
        try:
            await asyncio.sleep(0.3)
            return await super().on_message(info, envelope, body)
        finally:
            _SlowSink.active -= 1


async def test_destination_concurrency_caps_parallel_deliveries(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    _SlowSink.active = _SlowSink.most = 0
    behaviour = SinkBehaviour(tmp_path / "slow", fsync=False)
    server = build_sink("127.0.0.1", 0, behaviour)
    server.new_handler = lambda: _SlowSink(behaviour)
    await server.start()
    try:
        port = server.bound_ports()["sink"]
        gw = await gateway_factory(
            **NO_SPOOF,
            queue={"destination_concurrency": 2, "max_deliveries": 50},
            send_connectors=[_connector("slow", port)],
        )
        for n in range(8):
            await asyncio.to_thread(_send, gw.port, [f"user{n}@example.com"])
        deadline = asyncio.get_running_loop().time() + 20
        while len(list(behaviour.directory.glob("*.eml"))) < 8:
            assert asyncio.get_running_loop().time() < deadline, "not all delivered"
            await asyncio.sleep(0.05)
        assert _SlowSink.most == 2  # eight waiting, never more than two at the sink at once
    finally:
        await server.stop(1)


async def test_a_smarthost_given_by_name_is_resolved_with_gateway_dns(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    """Only the gateway's DNS knows relay.test: MX delivery used it, the smarthost
    name went to the system resolver (and failed), and so did connector verify."""
    dns_server, dns_port = await start_dns({("relay.test", "A"): ["127.0.0.1"]})
    try:
        gw = await gateway_factory(
            **NO_SPOOF,
            gateway={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
            send_connectors=[
                {
                    "name": "by-name",
                    "security": "none",
                    "deliver": {"smarthost": {"host": "relay.test", "port": sink.port}},
                }
            ],
        )
        await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
        [(meta, _)] = await sink.wait_for(1)
        assert meta["recipients"] == ["alice@example.com"]
        assert ("relay.test.", "A") in dns_server.queries
        config = gw.gateway.current().config
        steps = await verify_connector(config, config.send_connectors[0], None, None)
        assert [s.name for s in steps if s.ok] == ["target", "connect", "greeting", "EHLO"]
        assert steps[0].detail == f"smarthost relay.test (127.0.0.1):{sink.port}"
    finally:
        assert dns_server.transport is not None
        dns_server.transport.close()
