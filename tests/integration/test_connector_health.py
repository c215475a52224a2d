"""Connector health and failover driven by it, with real sinks that are down.

A "down" next hop here is a real TCP server that accepts connections and never
greets (what a hung smarthost looks like: each attempt waits out the command
timeout), or nothing listening at all. The tests count the connections it
gets: once the connector is known down, new mail no longer goes there.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from smtpgate.admin.accounts import create_user
from smtpgate.admin.api import create_app
from smtpgate.admin.services import ConfigService
from smtpgate.config.load import parse_config
from smtpgate.config.store import ConfigStore
from smtpgate.delivery.health import ConnectorHealth
from smtpgate.sink import SinkBehaviour, build_sink, parse_reply
from tests.clock import empty, wait_queue
from tests.conftest import (
    SMTPGATE,
    GatewayFactory,
    SinkHandle,
    base_config,
    free_port,
    merge,
    run_tool,
    start_sink,
)
from tests.integration.conftest import Api
from tests.integration.test_console_profiles import PASSWORD
from tests.integration.test_console_profiles import document as console_document

NO_SPOOF = {"spoof_detection": False}


class Blackhole:
    """Accepts TCP connections and says nothing (a hung next hop); counts them."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, port: int = 0) -> None:
        async def held(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)

        self.server = await asyncio.start_server(held, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()


@pytest.fixture
async def blackhole() -> AsyncIterator[Blackhole]:
    hole = Blackhole()
    await hole.start()
    yield hole
    await hole.stop()


@pytest.fixture
async def backup(tmp_path: Path) -> AsyncIterator[SinkHandle]:
    handle = await start_sink(tmp_path / "backup")
    yield handle
    await handle.server.stop(1)


def _connector(name: str, port: int, cost: int, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "security": "none",
        "cost": cost,
        "deliver": {"smarthost": {"host": "127.0.0.1", "port": port}},
        **extra,
    }


def _send(port: int, sender: str = "bob@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, ["alice@example.com"], b"Subject: t\r\n\r\nbody\r\n")


def _health(**extra: object) -> dict[str, object]:
    return {
        **NO_SPOOF,
        "timeouts": {"delivery_command": 1, "delivery_connect": 1},
        "queue": {"connector_health": {"down_after": 2, "probe_interval": 3600, **extra}},
    }


async def test_a_down_connector_is_skipped_and_the_backup_delivers_at_once(
    gateway_factory: GatewayFactory, blackhole: Blackhole, backup: SinkHandle
) -> None:
    gw = await gateway_factory(
        **_health(),
        send_connectors=[
            _connector("primary", blackhole.port, 1, failover_when_unreachable=True),
            _connector("backup", backup.port, 50),
        ],
    )
    for count in (1, 2):  # each waits out the 1 s greeting timeout, then fails over
        await asyncio.to_thread(_send, gw.port)
        await backup.wait_for(count)
    assert blackhole.connections == 2
    health = gw.gateway.manager.health
    assert health.state("primary", f"127.0.0.1:{blackhole.port}") == "down"
    started = time.monotonic()
    for _ in range(5):
        await asyncio.to_thread(_send, gw.port)
    assert len(await backup.wait_for(7)) == 7
    took = time.monotonic() - started
    assert blackhole.connections == 2  # known down: not tried again
    assert took < 2.5, f"five messages took {took:.1f} s: each waited for the dead hop"
    await wait_queue(gw.gateway, empty)
    pair = health.pair("primary", f"127.0.0.1:{blackhole.port}")
    assert pair is not None
    assert pair.consecutive_failures == 2
    assert "did not greet" in pair.last_error or "connection" in pair.last_error
    assert health.state("backup", f"127.0.0.1:{backup.port}") == "up"


async def test_a_probe_brings_the_connector_back_when_its_hop_returns(
    gateway_factory: GatewayFactory, tmp_path: Path, backup: SinkHandle
) -> None:
    port = free_port()  # nothing listens: connection refused
    gw = await gateway_factory(
        **_health(probe_interval=1),
        send_connectors=[
            _connector("primary", port, 1, failover_when_unreachable=True),
            _connector("backup", backup.port, 50),
        ],
    )
    for count in (1, 2, 3):
        await asyncio.to_thread(_send, gw.port)
        await backup.wait_for(count)
    health = gw.gateway.manager.health
    assert health.state("primary", f"127.0.0.1:{port}") == "down"
    behaviour = SinkBehaviour(tmp_path / "primary", fsync=False)
    primary = build_sink("127.0.0.1", port, behaviour)
    await primary.start()  # the next hop is back
    try:
        await asyncio.sleep(1.1)  # the probe is due
        await asyncio.to_thread(_send, gw.port)
        deadline = time.monotonic() + 10
        while not list(behaviour.directory.glob("*.eml")):
            assert time.monotonic() < deadline, "the probe never went to the primary"
            await asyncio.sleep(0.05)
        # the sink stores the message before its 250 reaches the gateway
        while health.state("primary", f"127.0.0.1:{port}") != "up":
            assert time.monotonic() < deadline, "the primary delivered but stayed down"
            await asyncio.sleep(0.05)
        assert len(backup.messages()) == 3
    finally:
        await primary.stop(1)


async def test_without_a_backup_mail_to_a_down_connector_is_deferred_untried(
    gateway_factory: GatewayFactory, blackhole: Blackhole
) -> None:
    gw = await gateway_factory(
        **_health(),
        send_connectors=[_connector("only", blackhole.port, 1, failover_when_unreachable=True)],
    )
    for _ in range(2):
        await asyncio.to_thread(_send, gw.port)
    deadline = time.monotonic() + 10
    while blackhole.connections < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    pair = ("only", f"127.0.0.1:{blackhole.port}")
    while gw.gateway.manager.health.state(*pair) != "down":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.to_thread(_send, gw.port)
    found = await wait_queue(
        gw.gateway,
        lambda ms: any("is down" in (r.last_reply or "") for m in ms for r in m.recipients),
    )
    replies = [r.last_reply or "" for m in found for r in m.recipients]
    assert any("4.4.1 connector only is down" in reply for reply in replies)
    assert blackhole.connections == 2


async def test_after_a_permanent_failure_no_dearer_connector_is_tried(
    gateway_factory: GatewayFactory, sink: SinkHandle, backup: SinkHandle
) -> None:
    sink.behaviour.refuse["alice@example.com"] = parse_reply("550 5.1.1 no such user")
    gw = await gateway_factory(
        **_health(),
        send_connectors=[
            _connector("primary", sink.port, 1, failover_when_unreachable=True),
            _connector("backup", backup.port, 50),
        ],
    )
    await asyncio.to_thread(_send, gw.port)
    await wait_queue(gw.gateway, empty)  # bounced (the report went to postmaster)
    assert [m["recipients"] for m, _ in backup.messages()] == []
    # a server that refuses is a server that answers: the connector is up
    assert gw.gateway.manager.health.state("primary", f"127.0.0.1:{sink.port}") == "up"


async def test_connector_status_shows_the_state_to_the_operator(
    gateway_factory: GatewayFactory, tmp_path: Path, blackhole: Blackhole, backup: SinkHandle
) -> None:
    overrides = {
        **_health(),
        "send_connectors": [
            _connector("primary", blackhole.port, 1, failover_when_unreachable=True),
            _connector("backup", backup.port, 50),
            _connector("unused", backup.port, 90, namespaces=[{"recipient": "x.example"}]),
        ],
    }
    gw = await gateway_factory(**overrides)
    for count in (1, 2):
        await asyncio.to_thread(_send, gw.port)
        await backup.wait_for(count)
    document = merge(base_config(tmp_path / "gw0", backup.port), overrides)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(document))
    data_dir = tmp_path / "gw0"
    assert (data_dir / "connectors.json").stat().st_mode & 0o777 == 0o600
    deadline = time.monotonic() + 10  # the sink has the message a moment before the
    while True:  # gateway has its reply and writes the board
        code, out = await run_tool(SMTPGATE, "connector", "status", "--config", str(config))
        if "backup " in out and " up " in out.split("backup ", 1)[1].split("\n")[0]:
            break
        assert time.monotonic() < deadline, out
        await asyncio.sleep(0.1)
    assert code == 1, out  # something is down
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["CONNECTOR", "DESTINATION", "STATE"]
    primary = next(line for line in lines if line.startswith("primary"))
    assert primary.split()[2:4] == ["down", "2"]
    assert next(line for line in lines if line.startswith("backup")).split()[2] == "up"
    assert next(line for line in lines if line.startswith("unused")).split()[2] == "unknown"
    code, out = await run_tool(SMTPGATE, "connector", "status", "--config", str(config), "--json")
    rows = json.loads(out)
    assert {r["connector"]: r["state"] for r in rows} == {
        "primary": "down",
        "backup": "up",
        "unused": "unknown",
    }


async def test_the_api_shows_connector_status(api: Api, sink: SinkHandle) -> None:
    await asyncio.to_thread(_send, api.gateway.port, "carol@elsewhere.example")
    await sink.wait_for(1)
    deadline = time.monotonic() + 10
    while True:
        rows = await api.ok("GET", "/connectors/status")
        if (rows and rows[0]["state"] == "up") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    [row] = rows
    assert row["connector"] == "to-sink"
    assert row["destination"] == f"127.0.0.1:{sink.port}"
    assert row["state"] == "up"
    assert row["consecutive_failures"] == 0
    assert row["last_success"] > 0


def test_the_console_shows_connector_status(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    service = ConfigService(ConfigStore.open(data_dir, ""), data_dir)
    try:
        document = console_document(data_dir) | {
            "send_connectors": [_connector("primary", 2525, 1), _connector("backup", 2526, 5)]
        }
        service.adopt_file(parse_config(document), "file:gateway.yaml")
        create_user(service.store, "audrey", PASSWORD, "auditor", "test")
        board = ConnectorHealth(lambda: (1, 60.0), data_dir / "connectors.json")
        board.record("primary", "127.0.0.1:2525", ok=False, error="4.4.1 unreachable: refused")
        client = TestClient(create_app(service))
        client.post("/login", data={"username": "audrey", "password": PASSWORD})
        page = client.get("/connectors").text
    finally:
        service.store.close()
    table = page[page.index('id="connector-status"') :]
    assert "Connector status" in page
    start = table.index("<td>primary</td>")
    primary = table[start : table.index("</tr>", start)]
    assert "<td>down</td>" in primary
    assert "4.4.1 unreachable: refused" in primary
    assert "<td>backup</td><td>-</td><td>unknown</td>" in table


def test_the_board_counts_and_probes_on_its_clock() -> None:
    now = [1000.0]
    board = ConnectorHealth(lambda: (3, 60.0), None, clock=lambda: now[0])
    assert board.allow("c", "d")
    board.record("c", "d", ok=False, error="4.4.1 unreachable: refused")
    assert board.state("c", "d") == "failing"
    board.record("c", "d", ok=False, error="x")
    board.record("c", "d", ok=False, error="4.4.1 unreachable: timed out")
    assert board.state("c", "d") == "down"
    assert not board.allow("c", "d")
    now[0] += 61
    assert board.allow("c", "d")  # the probe
    assert not board.allow("c", "d")  # one probe at a time
    board.record("c", "d", ok=True)
    assert board.state("c", "d") == "up"
    assert board.allow("c", "d")
    row = board.rows()[0]
    assert row["last_error"] == "4.4.1 unreachable: timed out"
    assert row["consecutive_failures"] == 0
