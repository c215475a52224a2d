"""The mail log: the lines of a delivered, a deferred and a bounced message, a
report and a refusal match the formats documented in docs/operations.md."""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.proto.replies import Reply
from tests.conftest import SinkHandle
from tests.integration.observing import (
    Served,
    documented_formats,
    mail_lines,
    send,
    serve,
    wait_until,
)


@pytest.fixture
def served(tmp_path: Path, sink: SinkHandle) -> Iterator[Served]:
    sink.behaviour.refuse["bounce@example.com"] = Reply.of(550, "5.1.1", "no such user here")
    sink.behaviour.refuse["later@example.com"] = Reply.of(451, "4.3.0", "try again later")
    blocked = {"name": "blocked", "client_hosts": ["127.0.0.3"], "relay": "blocked"}
    handle = serve(tmp_path, sink.port, connection_profiles=[blocked])
    yield handle
    handle.stop()


def _matching(served: Served, name: str, **fields: str) -> list[dict[str, str]]:
    pattern = documented_formats()[name]
    found = []
    for line in mail_lines(served.lines()):
        matched = pattern.match(line)
        if matched and all(matched[k] == v for k, v in fields.items()):
            found.append(matched.groupdict())
    return found


async def test_delivered_deferred_and_bounced_lines_match_the_documented_formats(
    served: Served, sink: SinkHandle
) -> None:
    for rcpt, mid in (
        ("bob@example.com", "<sent.1@example.org>"),
        ("later@example.com", "<deferred.1@example.org>"),
        ("bounce@example.com", "<bounced.1@example.org>"),
    ):
        await asyncio.to_thread(send, served.port, "alice@outside.test", [rcpt], mid)

    async def line(name: str, **fields: str) -> dict[str, str]:
        found = await wait_until(lambda: _matching(served, name, **fields))
        assert found, f"no {name} line with {fields}:\n" + "\n".join(served.lines()[-40:])
        return found[0]

    queued = await line("queued", message_id="<sent.1@example.org>")
    assert queued["sender"] == "alice@outside.test"
    assert (queued["nrcpt"], queued["tls"], queued["listener"]) == ("1", "none", "mx")
    assert queued["client"] == "unknown[127.0.0.1]"
    assert int(queued["size"]) > 0

    sent = await line("delivery", to="bob@example.com")
    assert sent["queue_id"] == queued["queue_id"]
    assert sent["status"] == "sent"
    assert sent["dsn"] == "2.0.0"
    assert sent["relay"] == f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert sent["connector"] == "to-sink"
    assert sent["reply"].startswith("250 2.0.0 Ok: stored as ")

    deferred = await line("delivery", to="later@example.com")
    assert (deferred["status"], deferred["dsn"]) == ("deferred", "4.3.0")
    assert deferred["reply"] == "451 4.3.0 try again later"

    bounced = await line("delivery", to="bounce@example.com")
    assert (bounced["status"], bounced["dsn"]) == ("bounced", "5.1.1")
    assert bounced["reply"] == "550 5.1.1 no such user here"
    report = await line("report", queue_id=bounced["queue_id"])
    assert (report["kind"], report["to"]) == ("non-delivery", "alice@outside.test")


async def test_a_refused_recipient_leaves_a_noqueue_line(served: Served) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(
            send, served.port, "alice@outside.test", ["someone@elsewhere.test"], "<r.1@x>"
        )
    found = await wait_until(lambda: _matching(served, "reject", stage="RCPT"))
    assert found, "\n".join(served.lines()[-30:])
    refused = found[0]
    assert refused["queue_id"] == "NOQUEUE"
    assert refused["client"] == "unknown[127.0.0.1]"
    assert refused["reply"].startswith("554 5.7.1")
    assert refused["facts"].startswith("from=<alice@outside.test> to=<someone@elsewhere.test>")
    assert "proto=ESMTP helo=<" in refused["facts"]


async def test_json_lines_carry_the_same_text_and_the_facts(
    tmp_path: Path, sink: SinkHandle
) -> None:
    served = serve(tmp_path, sink.port, json=True)
    try:
        await asyncio.to_thread(
            send, served.port, "alice@outside.test", ["bob@example.com"], "<j.1@example.org>"
        )

        def delivered() -> list[dict[str, object]]:
            found = []
            for text in served.lines():
                if text.startswith("{") and '"event": "mail"' in text:
                    found.append(json.loads(text))
            return [e for e in found if e.get("kind") == "DeliveryAttempt"]

        events = await wait_until(delivered)
        assert events, "\n".join(served.lines()[-20:])
        event = events[0]
        assert documented_formats()["delivery"].match(str(event["line"]))
        assert (event["recipient"], event["status"]) == ("bob@example.com", "sent")
    finally:
        served.stop()


def _greeting_from(port: int, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as c:
        return c.recv(512)


async def test_a_blocked_client_leaves_a_connect_reject_line(served: Served) -> None:
    greeting = await asyncio.to_thread(_greeting_from, served.port, "127.0.0.3")
    assert greeting.startswith(b"554 ")
    found = await wait_until(lambda: _matching(served, "reject", stage="CONNECT"))
    assert found, "\n".join(served.lines()[-30:])
    refused = found[0]
    assert (refused["queue_id"], refused["client"]) == ("NOQUEUE", "unknown[127.0.0.3]")
    assert refused["reply"].startswith("554 ")
    assert refused["facts"] == "listener=mx profile=blocked"
