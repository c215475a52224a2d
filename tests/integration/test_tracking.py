"""Message tracking: ``smtpgate trace`` and ``GET /api/v1/trace`` find a
delivered, a bounced and a refused message, with what happened to each."""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from smtpgate.admin.accounts import create_user
from smtpgate.admin.api import create_app
from smtpgate.admin.services import ConfigService
from smtpgate.config.store import ConfigStore
from smtpgate.observe.tracking import Query, search
from smtpgate.proto.replies import Reply
from tests.conftest import SMTPGATE, SinkHandle, run_tool
from tests.integration.conftest import make_token
from tests.integration.observing import Served, send, serve, wait_until
from tests.integration.test_console_profiles import PASSWORD


@pytest.fixture
async def served(tmp_path: Path, sink: SinkHandle) -> AsyncIterator[Served]:
    sink.behaviour.refuse["gone@example.com"] = Reply.of(550, "5.1.1", "no such user here")
    handle = serve(tmp_path, sink.port)
    yield handle
    handle.stop()


async def trace(served: Served, *criteria: str) -> list[dict[str, Any]]:
    code, out = await run_tool(
        SMTPGATE, "trace", *criteria, "--data-dir", str(served.data_dir), "--json"
    )
    assert code in (0, 1), out
    found: list[dict[str, Any]] = json.loads(out)
    return found


async def settled(served: Served, query: Query, status: str) -> dict[str, Any]:
    async def found() -> list[dict[str, Any]]:
        records = await asyncio.to_thread(search, served.data_dir, query)
        return [r for r in records if r["status"] == status]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if records := await found():
            return records[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {status} record for {query}")


async def test_trace_finds_delivered_bounced_and_refused_messages(served: Served) -> None:  # noqa: PLR0915 - one run of traffic, every way to find it
    started = time.time()
    await asyncio.to_thread(send, served.port, "ann@outside.test", ["bob@example.com"], "<ok.1@t>")
    await asyncio.to_thread(send, served.port, "ann@outside.test", ["gone@example.com"], "<b.1@t>")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(
            send, served.port, "eve@outside.test", ["x@elsewhere.test"], "<r.1@t>"
        )
    await settled(served, Query(recipient="bob@example.com"), "sent")
    await settled(served, Query(recipient="gone@example.com"), "bounced")

    # delivered: by Message-ID, with the session's facts and the attempt
    [sent] = await trace(served, "--message-id", "ok.1@t")
    kinds = [e["kind"] for e in sent["events"]]
    assert kinds == ["verdict", "accepted", "attempt"]
    verdict, accepted, attempt = sent["events"]
    assert verdict["action"] == "accept"
    assert ["dmarc", "accept"] in verdict["results"]  # the scanners before the 250
    assert accepted["client"]["ip"] == "127.0.0.1"
    assert accepted["client"]["listener"] == "mx"
    assert accepted["client"]["profile"] == "default"
    assert accepted["sender"] == "ann@outside.test"
    assert accepted["recipients"] == ["bob@example.com"]
    assert [
        "profile",
        "default (the default profile: no profile matches the client IP or host name)",
    ] in accepted["verdicts"]
    assert (attempt["status"], attempt["dsn"], attempt["connector"]) == ("sent", "2.0.0", "to-sink")
    assert attempt["reply"].startswith("250 2.0.0 Ok: stored as")
    assert attempt["relay"].startswith("127.0.0.1[127.0.0.1]:")
    assert attempt["tls"] is None
    assert sent["status"] == "sent"

    # by queue id: the same record
    [again] = await trace(served, sent["queue_id"])
    assert again["events"] == sent["events"]

    # bounced: by recipient, with the remote reply and the report sent
    [bounced] = await trace(served, "--recipient", "gone@example.com")
    assert bounced["status"] == "bounced"
    attempt = next(e for e in bounced["events"] if e["kind"] == "attempt")
    assert (attempt["status"], attempt["dsn"]) == ("bounced", "5.1.1")
    assert attempt["reply"] == "550 5.1.1 no such user here"
    report = await wait_until(
        lambda: [
            e
            for e in search(served.data_dir, Query(queue_id=bounced["queue_id"]))[0]["events"]
            if e["kind"] == "dsn"
        ]
    )
    assert report
    assert (report[0]["action"], report[0]["to"]) == ("failed", "ann@outside.test")

    # refused: by sender and time window; the reply and the reason
    [refused] = await trace(served, "--sender", "eve@outside.test", "--since", str(started))
    assert (refused["queue_id"], refused["status"]) == ("NOQUEUE", "refused")
    [event] = refused["events"]
    assert (event["stage"], event["recipient"]) == ("RCPT", "x@elsewhere.test")
    assert event["reply"].startswith("554 5.7.1")
    assert "relay" in event["reason"]
    assert await trace(served, "--sender", "eve@outside.test", "--until", str(started - 60)) == []

    # the text output names each message and event
    code, out = await run_tool(
        SMTPGATE, "trace", "--data-dir", str(served.data_dir), "--since", "1h"
    )
    assert code == 0, out
    assert f"{sent['queue_id']}  sent" in out
    assert "refused at RCPT from unknown[127.0.0.1]: 554 5.7.1" in out
    assert "-- 4 message(s)" in out  # and the report to ann (no route to outside.test)

    # the same over the API (a token needed)
    token = await asyncio.to_thread(make_token, served.config)
    url = f"http://127.0.0.1:{served.api_port}/api/v1/trace"
    async with httpx.AsyncClient() as client:
        assert (await client.get(url, params={"queue_id": sent["queue_id"]})).status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        response = await client.get(url, params={"recipient": "gone@example.com"}, headers=headers)
        assert response.status_code == 200, response.text
        assert [r["queue_id"] for r in response.json()] == [bounced["queue_id"]]
        wrong = await client.get(url, params={"since": "yesterday"}, headers=headers)
        assert wrong.status_code == 422


async def test_the_console_tracking_page_shows_what_happened(served: Served) -> None:
    await asyncio.to_thread(send, served.port, "ann@outside.test", ["gone@example.com"], "<c.1@t>")
    record = await settled(served, Query(recipient="gone@example.com"), "bounced")
    service = ConfigService(ConfigStore.open(served.data_dir), served.data_dir)
    try:
        create_user(service.store, "alice", PASSWORD, "auditor", "test")
        client = TestClient(create_app(service))
        login = client.post("/login", data={"username": "alice", "password": PASSWORD})
        assert login.status_code == 200
        page = client.get("/tracking", params={"recipient": "gone@example.com"})
        assert page.status_code == 200
        html = page.text
        assert f"<code>{record['queue_id']}</code>" in html
        assert "bounced" in html
        assert "550 5.1.1 no such user here" in html
        assert 'href="/tracking"' in client.get("/").text  # in the navigation
        wrong = client.get("/tracking", params={"since": "last week"})
        assert wrong.status_code == 422
    finally:
        service.store.close()
