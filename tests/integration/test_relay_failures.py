"""The interim hand-off: 250 only after the next hop said 250, never a loss."""

from __future__ import annotations

import asyncio
import smtplib

import pytest

from smtpgate.sink import parse_reply
from tests.conftest import GatewayFactory, GatewayHandle, SinkHandle, free_port


def _send(port: int, to: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail("a@elsewhere.example", to, b"Subject: t\r\n\r\nbody\r\n")


async def test_next_hop_temporary_failure_reaches_the_client_as_4xx(
    gateway: GatewayHandle, sink: SinkHandle
) -> None:
    sink.behaviour.data_replies.append(parse_reply("451 4.3.0 mailbox busy"))
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(_send, gateway.port, ["alice@example.com"])
    assert caught.value.smtp_code == 451
    assert b"4.3.0" in caught.value.smtp_error
    await asyncio.to_thread(_send, gateway.port, ["alice@example.com"])  # the retry succeeds
    assert len(sink.messages()) == 1


async def test_next_hop_refusing_a_recipient_fails_the_whole_message(
    gateway: GatewayHandle, sink: SinkHandle
) -> None:
    sink.behaviour.rcpt_reply = parse_reply("550 5.1.1 no such user")
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(_send, gateway.port, ["alice@example.com", "bob@example.com"])
    assert caught.value.smtp_code == 550
    assert b"5.1.1" in caught.value.smtp_error
    assert sink.messages() == []


async def test_unreachable_smarthost_gives_451(gateway_factory: GatewayFactory) -> None:
    dead = free_port()
    gw = await gateway_factory(
        send_connectors=[
            {
                "name": "dead",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": dead}},
                "security": "none",
            }
        ]
    )
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
    assert caught.value.smtp_code == 451
    assert b"4.4.1" in caught.value.smtp_error


async def test_cheapest_connector_wins_and_routes_split_transactions(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    dead = free_port()
    gw = await gateway_factory(
        send_connectors=[
            {
                "name": "sink",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
                "security": "none",
                "cost": 5,
                "namespaces": [{"recipient": "example.com"}],
            },
            {
                "name": "dearer",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": dead}},
                "security": "none",
                "cost": 50,
            },
            {
                "name": "org",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
                "security": "none",
                "cost": 10,
                "namespaces": [{"recipient": "example.org"}],
            },
        ]
    )
    refused = await asyncio.to_thread(_send, gw.port, ["alice@example.com", "bob@example.org"])
    assert refused["bob@example.org"][0] == 452
    await asyncio.to_thread(_send, gw.port, ["bob@example.org"])
    assert [meta["recipients"] for meta, _ in sink.messages()] == [
        ["alice@example.com"],
        ["bob@example.org"],
    ]


async def test_no_connector_means_550_at_rcpt(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(send_connectors=[])
    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        await asyncio.to_thread(_send, gw.port, ["alice@example.com"])
    assert caught.value.recipients["alice@example.com"][0] == 550
