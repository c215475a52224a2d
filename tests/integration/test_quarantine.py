"""The quarantine: EICAR held by clamd's verdict, listed and released with the
CLI while the gateway runs, expired after its retention on a clock the test
moves, and the API and console pages (list, release, delete; audited; the
auditor reads but gets 403).

What a user notices: the client hears 250 for a held message and nothing
reaches the sink until an administrator releases it; then it arrives.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from smtpgate.admin import accounts
from smtpgate.admin.api import create_app
from smtpgate.admin.services import ConfigService, create_token
from smtpgate.config.load import parse_config
from smtpgate.config.store import ConfigStore
from smtpgate.content.quarantine import QuarantineStore, quarantine_dir
from smtpgate.content.verdict import ScanResult, combine
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.queue.store import QueueStore
from smtpgate.spool import SpooledBody, new_queue_id
from tests.clamd import EICAR, SIGNATURE, Clamd, clamd_fixture  # noqa: F401 - the fixture
from tests.clock import FakeClock
from tests.conftest import SMTPGATE, GatewayFactory, SinkHandle, run_tool

DAY = 86400.0
PASSWORD = "correct horse battery"


def message(body: bytes, subject: str) -> bytes:
    return (
        b"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\nSubject: "
        + subject.encode()
        + b"\r\nContent-Type: text/plain\r\n\r\n"
        + body
        + b"\r\n"
    )


def send(port: int, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.sender.test")
        client.mail("alice@sender.test")
        client.rcpt("bob@example.com")
        return client.data(data)


async def tool(*argv: str) -> tuple[int, str]:
    return await run_tool(SMTPGATE, "quarantine", *argv)


async def test_infected_message_held_listed_released_and_delivered(
    gateway_factory: GatewayFactory, sink: SinkHandle, clamd: Clamd
) -> None:
    handle = await gateway_factory(virus={"clamd": clamd.address, "infected": "quarantine"})
    data_dir = str(handle.gateway.started.gateway.data_dir)
    code, text = await asyncio.to_thread(send, handle.port, message(EICAR, "held"))
    assert code == 250, text
    held_id = text.decode().rsplit(" ", 1)[-1]
    # the held message is durable on disk, private, with its verdict
    directory = quarantine_dir(Path(data_dir))
    for suffix in (".json", ".eml"):
        mode = stat.S_IMODE((directory / f"{held_id}{suffix}").stat().st_mode)
        assert mode == 0o600, suffix
    code, _ = await asyncio.to_thread(send, handle.port, message(b"clean", "clean"))
    assert code == 250
    found = await sink.wait_for(1)
    assert [message_subject(body) for _meta, body in found] == ["clean"]

    status, listing = await tool("list", "--data-dir", data_dir)
    assert status == 0, listing
    assert held_id in listing
    assert f"clamd: virus {SIGNATURE}" in listing
    status, shown = await tool("show", held_id, "--data-dir", data_dir)
    assert status == 0, shown
    entry = json.loads(shown)
    assert entry["envelope"]["recipients"][0]["address"] == "bob@example.com"
    (clamd_result,) = [r for r in entry["results"] if r["scanner"] == "clamd"]
    assert clamd_result["action"] == "quarantine"
    assert clamd_result["detail"]["signature"].startswith(SIGNATURE)
    assert "Subject: held" in entry["headers"]

    status, out = await tool("release", held_id, "--data-dir", data_dir)
    assert status == 0, out
    found = await sink.wait_for(2)
    assert [message_subject(body) for _meta, body in found] == ["clean", "held"]
    assert EICAR in found[1][1]
    assert found[1][0]["recipients"] == ["bob@example.com"]
    status, listing = await tool("list", "--data-dir", data_dir, "--json")
    assert json.loads(listing) == []
    status, out = await tool("release", held_id, "--data-dir", data_dir)
    assert status == 1
    assert "no message" in out


def message_subject(body: bytes) -> str:
    found = re.search(rb"^Subject: (.*)\r$", body, re.MULTILINE)
    return found.group(1).decode() if found else ""


async def test_retention_expires_held_messages_on_the_gateways_clock(
    gateway_factory: GatewayFactory, sink: SinkHandle, clamd: Clamd
) -> None:
    handle = await gateway_factory(
        virus={"clamd": clamd.address, "infected": "quarantine"},
        quarantine={"retention_days": 30},
    )
    quarantine = handle.gateway.quarantine
    assert quarantine is not None
    clock = FakeClock()
    quarantine.clock = clock
    data_dir = str(handle.gateway.started.gateway.data_dir)
    ids = []
    for subject in ("first", "second"):
        code, text = await asyncio.to_thread(send, handle.port, message(EICAR, subject))
        assert code == 250
        ids.append(text.decode().rsplit(" ", 1)[-1])
    status, out = await tool("delete", ids[1], "--data-dir", data_dir)
    assert (status, out.strip()) == (0, f"{ids[1]}: deleted")
    clock.advance(29 * DAY)
    assert await quarantine.expire_once() == []
    assert [h.id for h in quarantine.store.entries()] == [ids[0]]
    clock.advance(1 * DAY)
    quarantine.wake.set()  # the gateway's own expiry task looks now
    for _ in range(100):
        if not quarantine.store.entries():
            break
        await asyncio.sleep(0.05)
    assert quarantine.store.entries() == []
    assert not list(quarantine_dir(Path(data_dir)).iterdir())
    assert sink.messages() == []


# -- the API and the console, in-process ---------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ConfigService]:
    data_dir = tmp_path / "var"
    service = ConfigService(ConfigStore.open(data_dir, ""), data_dir)
    document = {
        "gateway": {"hostname": "gw.test", "data_dir": str(data_dir)},
        "hosted_domains": ["example.com"],
        "listeners": [{"name": "mx", "address": "127.0.0.1:2525", "security": "none"}],
    }
    service.adopt_file(parse_config(document), "file:gateway.yaml")
    accounts.create_user(service.store, "alice", PASSWORD, "admin", "test")
    accounts.create_user(service.store, "audrey", PASSWORD, "auditor", "test")
    yield service
    service.store.close()


def hold(service: ConfigService, subject: str, lines: int = 1) -> str:
    """A message held as the gateway holds one (the store's ``hold``); many
    ``lines``: a body spilled to a spool file, moved into the quarantine."""
    spool = service.data_dir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    body = SpooledBody(spool, new_queue_id())
    body.write(message(b"suspicious\r\n" * lines, subject))
    body.finish()
    envelope = Envelope("alice@sender.test", (Recipient("bob@example.com"),), client_ip="192.0.2.9")
    verdict = ScanResult("clamd", "quarantine", reason="virus Test.Sig", detail={"signature": "T"})
    QuarantineStore(quarantine_dir(service.data_dir)).hold(envelope, body, combine([verdict]))
    return body.queue_id


def login(service: ConfigService, name: str) -> TestClient:
    client = TestClient(create_app(service))
    response = client.post("/login", data={"username": name, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return client


def csrf(client: TestClient, page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(page).text)
    assert found, "no CSRF token on the page"
    return found.group(1)


def queued(service: ConfigService, message_id: str) -> bool:
    store = QueueStore(service.data_dir / "queue")
    try:
        return store.get(message_id) is not None
    finally:
        store.close()


def audited(service: ConfigService) -> list[tuple[str, str, str]]:
    return [(e.actor, e.action, e.detail) for e in service.store.audit_log(20)]


def test_api_lists_shows_releases_and_deletes(service: ConfigService) -> None:
    first, second = hold(service, "one", lines=20_000), hold(service, "two")
    assert not list((service.data_dir / "spool").iterdir())  # moved, not copied
    token = create_token(service.store, "ops", "test")
    api = TestClient(create_app(service), headers={"Authorization": f"Bearer {token}"})
    listing: list[dict[str, Any]] = api.get("/api/v1/quarantine").json()
    assert [e["id"] for e in listing] == [first, second]
    assert listing[0]["reason"] == "virus Test.Sig"
    shown = api.get(f"/api/v1/quarantine/{first}").json()
    assert "Subject: one" in shown["headers"]
    assert api.post(f"/api/v1/quarantine/{first}/release").json()["result"] == "released"
    assert queued(service, first)
    store = QueueStore(service.data_dir / "queue")
    try:
        released = store.body(first)
        assert isinstance(released, Path)  # a large body stays a file, whole
        assert released.read_bytes().count(b"suspicious") == 20_000
    finally:
        store.close()
    assert api.delete(f"/api/v1/quarantine/{second}").json()["result"] == "deleted"
    assert not queued(service, second)
    assert api.get("/api/v1/quarantine").json() == []
    assert api.get(f"/api/v1/quarantine/{first}").status_code == 404
    assert ("token:ops", "quarantine.release", first) in audited(service)
    assert ("token:ops", "quarantine.delete", second) in audited(service)
    assert TestClient(create_app(service)).get("/api/v1/quarantine").status_code == 401


def test_console_page_release_delete_and_the_auditor(service: ConfigService) -> None:
    first, second = hold(service, "one"), hold(service, "two")
    auditor = login(service, "audrey")
    page = auditor.get("/quarantine")
    assert page.status_code == 200
    assert first in page.text
    assert "virus Test.Sig" in page.text
    detail = auditor.get(f"/quarantine/{first}")
    assert detail.status_code == 200
    assert "Release" not in detail.text
    token = csrf(auditor, "/quarantine")
    for action in ("release", "delete"):
        response = auditor.post(
            f"/quarantine/{first}/{action}", data={"csrf": token}, follow_redirects=False
        )
        assert response.status_code == 403, action
    admin = login(service, "alice")
    assert 'href="/quarantine"' in admin.get("/").text
    page = admin.get(f"/quarantine/{first}")
    assert "Release" in page.text
    assert "Subject: one" in page.text
    token = csrf(admin, f"/quarantine/{first}")
    for message_id, action in ((first, "release"), (second, "delete")):
        response = admin.post(
            f"/quarantine/{message_id}/{action}", data={"csrf": token}, follow_redirects=False
        )
        assert response.status_code == 303, response.text
    assert queued(service, first)
    assert not queued(service, second)
    assert "The quarantine is empty." in admin.get("/quarantine").text
    assert admin.get(f"/quarantine/{first}").status_code == 404
    assert ("user:alice", "quarantine.release", first) in audited(service)
    assert ("user:alice", "quarantine.delete", second) in audited(service)
