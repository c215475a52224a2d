"""Virus scanning by clamd: a private clamd, a real gateway on loopback, a sink.

What a user notices: the SMTP reply the client got, what arrived at the sink
and the ``X-Virus-*`` fields it carries. EICAR is refused with 550 naming the
signature; a clean message arrives with ``X-Virus-Scanned`` (over TCP and
over the unix socket); with clamd stopped, fail-open delivers marked
"unchecked" and fail-closed answers 451 until clamd is back; a message over
the stream limit gets the configured decision, never a silent "clean".
"""

from __future__ import annotations

import asyncio
import smtplib
from email import message_from_bytes
from typing import Any

import pytest

from smtpgate.config import parse_config
from smtpgate.config.validate import warnings
from smtpgate.content.clamd import frames, parse_reply
from smtpgate.errors import ConfigError
from tests.clamd import EICAR, SIGNATURE, STREAM_MAX, Clamd, clamd_fixture  # noqa: F401 - the fixture
from tests.conftest import GatewayFactory, SinkHandle


def message(body: bytes, subject: str = "hello") -> bytes:
    return (
        b"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\n"
        b"Subject: " + subject.encode() + b"\r\nDate: Sun, 29 Nov 2026 12:00:00 +0000\r\n"
        b"Content-Type: text/plain\r\n\r\n" + body + b"\r\n"
    )


def send(port: int, data: bytes) -> tuple[int, bytes]:
    """One message; the reply to the end of DATA (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.sender.test")
        client.mail("alice@sender.test")
        client.rcpt("bob@example.com")
        return client.data(data)


async def refused(port: int, data: bytes) -> tuple[int, bytes]:
    """The refusal at the end of DATA (smtplib's ``data`` returns it)."""
    code, text = await asyncio.to_thread(send, port, data)
    assert code != 250, "accepted"
    return code, text


async def gateway_with(gateway_factory: GatewayFactory, address: str, **virus: Any) -> int:
    handle = await gateway_factory(virus={"clamd": address, "timeout": 10, **virus})
    return handle.port


def test_instream_frames_and_replies() -> None:
    sent = b"".join(frames(iter([b"abc", b"", b"d"])))
    assert sent == b"zINSTREAM\0" + b"\0\0\0\3abc" + b"\0\0\0\1d" + b"\0\0\0\0"
    assert parse_reply("stream: OK") is None
    assert parse_reply("stream: Eicar-Signature FOUND") == "Eicar-Signature"


def config_with(**virus: Any) -> dict[str, Any]:
    return {
        "gateway": {"hostname": "gw.test"},
        "listeners": [{"name": "mx", "address": "127.0.0.1:2525", "security": "none"}],
        "virus": virus,
    }


@pytest.mark.parametrize(
    "address", ["tcp://localhost:3310", "tcp://127.0.0.1:0", "unix:relative", "127.0.0.1:3310"]
)
def test_a_bad_clamd_address_is_named(address: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(clamd=address))
    assert [p.path for p in caught.value.problems] == ["virus.clamd"]


def test_config_check_warns_of_mail_let_through_unchecked() -> None:
    config = parse_config(config_with(clamd="unix:/run/clamav/clamd.ctl", fail="open"))
    assert [w.path for w in warnings(config)] == ["virus.fail"]
    config = parse_config(config_with(clamd="tcp://127.0.0.1:3310", max_size=1024 * 1024))
    assert [w.path for w in warnings(config)] == ["virus.max_size"]
    config = parse_config(config_with(clamd="tcp://127.0.0.1:3310"))
    assert warnings(config) == []


async def test_eicar_refused_naming_the_signature_clean_delivered(
    gateway_factory: GatewayFactory, sink: SinkHandle, clamd: Clamd
) -> None:
    port = await gateway_with(gateway_factory, clamd.address)
    code, text = await refused(port, message(b"hello " + EICAR))
    assert code == 550
    assert text.startswith(b"5.7.1 ")
    assert SIGNATURE.encode() in text
    code, _ = await asyncio.to_thread(send, port, message(b"Lunch at noon?"))
    assert code == 250
    found = await sink.wait_for(1)
    assert len(found) == 1, "the infected message reached the sink"
    parsed = message_from_bytes(found[0][1])
    assert parsed["X-Virus-Scanned"] == "clamd on gw.test: clean"
    assert b"EICAR" not in found[0][1]


async def test_over_the_unix_socket(
    gateway_factory: GatewayFactory, sink: SinkHandle, clamd: Clamd
) -> None:
    port = await gateway_with(gateway_factory, clamd.unix_address)
    assert (await refused(port, message(EICAR)))[0] == 550
    code, _ = await asyncio.to_thread(send, port, message(b"via the socket"))
    assert code == 250
    (_meta, body), *_ = await sink.wait_for(1)
    assert message_from_bytes(body)["X-Virus-Scanned"] == "clamd on gw.test: clean"


async def test_clamd_down_fail_open_delivers_unchecked(
    gateway_factory: GatewayFactory, sink: SinkHandle, clamd: Clamd
) -> None:
    port = await gateway_with(gateway_factory, clamd.address, fail="open")
    clamd.stop()
    code, _ = await asyncio.to_thread(send, port, message(b"while clamd is away"))
    assert code == 250
    (_meta, body), *_ = await sink.wait_for(1)
    parsed = message_from_bytes(body)
    assert parsed["X-Virus-Status"] == "unchecked (scanner unavailable)"
    assert parsed["X-Virus-Scanned"] is None


async def test_clamd_down_fail_closed_defers_until_it_is_back(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    clamd: Clamd,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = await gateway_with(gateway_factory, clamd.address, fail="closed")
    data = message(b"deferred, then delivered")
    clamd.stop()
    for _attempt in range(2):
        code, text = await refused(port, data)
        assert (code, text[:6]) == (451, b"4.7.1 ")
    assert sink.messages() == []
    await clamd.start()
    code, _ = await asyncio.to_thread(send, port, data)  # the client's retry
    assert code == 250
    (_meta, body), *_ = await sink.wait_for(1)
    assert message_from_bytes(body)["X-Virus-Scanned"] == "clamd on gw.test: clean"
    events = [line.split("] ", 1)[-1] for line in capsys.readouterr().out.splitlines()]
    assert sum(e.startswith("clamd unavailable ") for e in events) == 1  # once per outage
    assert sum(e.startswith("clamd reachable again ") for e in events) == 1


BIG = message((b"y" * 76 + b"\r\n") * (STREAM_MAX // 70), "big")


async def test_over_clamds_stream_limit_accepted_marked_unchecked(
    gateway_factory: GatewayFactory, sink: SinkHandle, clamd: Clamd
) -> None:
    assert len(BIG) > STREAM_MAX
    port = await gateway_with(gateway_factory, clamd.address, over_limit="accept")
    code, _ = await asyncio.to_thread(send, port, BIG)
    assert code == 250
    (_meta, body), *_ = await sink.wait_for(1)
    parsed = message_from_bytes(body)
    assert parsed["X-Virus-Status"] == "unchecked (too large)"
    assert parsed["X-Virus-Scanned"] is None


async def test_over_the_limit_refused_or_deferred_by_setting(
    gateway_factory: GatewayFactory, sink: SinkHandle, clamd: Clamd
) -> None:
    port = await gateway_with(gateway_factory, clamd.address, over_limit="reject")
    code, text = await refused(port, BIG)  # over clamd's StreamMaxLength
    assert (code, text[:6]) == (552, b"5.3.4 ")
    port = await gateway_with(
        gateway_factory, clamd.address, over_limit="tempfail", max_size=64 * 1024
    )
    over_max_size = message((b"z" * 76 + b"\r\n") * 900)  # over the gateway's own max_size
    code, text = await refused(port, over_max_size)
    assert (code, text[:6]) == (451, b"4.7.1 ")
    assert sink.messages() == []


async def test_a_scanner_that_is_down_shows_in_the_gateways_status(
    gateway_factory: GatewayFactory, sink: SinkHandle, clamd: Clamd
) -> None:
    """What the gateway publishes for /api/v1/status and cluster status."""
    from smtpgate.app import status_of  # noqa: PLC0415

    handle = await gateway_factory(virus={"clamd": clamd.address, "timeout": 10, "fail": "open"})
    assert status_of(handle.gateway)["scanners"]["clamd"] == "up"
    clamd.stop()
    code, _ = await asyncio.to_thread(send, handle.port, message(b"while clamd is away"))
    assert code == 250
    assert status_of(handle.gateway)["scanners"]["clamd"].startswith("down: ")
    await clamd.start()
    code, _ = await asyncio.to_thread(send, handle.port, message(b"and back"))
    assert code == 250
    assert status_of(handle.gateway)["scanners"]["clamd"] == "up"
