"""The POP3 fetch connector against a real Dovecot (``dovecot-pop3d``) on loopback.

Mail is put into a Maildir, the gateway fetches it over POP3S or STLS, and it
arrives at the real sink through the gateway's ingest and queue; the mailbox
is emptied only after the queue committed it. The crash test kills a real
``smtpgate serve`` with SIGKILL at the moment it sends its first DELE (a
proxy between it and Dovecot watches the commands), then starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpgate.config.secret import encrypt, load_key
from smtpgate.config.store import ConfigStore
from tests.clock import empty, wait_queue
from tests.conftest import (
    SMTPGATE,
    Certs,
    GatewayFactory,
    GatewayProcess,
    SinkHandle,
    free_port,
    run_tool,
)
from tests.dovecot import Dovecot, running_dovecot

PASSWORD = "pop-Secret-4711"
NO_SPOOF = {"spoof_detection": False}


def message(n: int, sender: str = "carol@elsewhere.example") -> bytes:
    return (
        f"Return-Path: <{sender}>\r\nFrom: {sender}\r\nTo: alice@example.com\r\n"
        f"Subject: fetched {n}\r\nMessage-ID: <m{n}@elsewhere.example>\r\n\r\n"
        f"body {n}\r\n.leading dot\r\n"
    ).encode()


@pytest.fixture
def dovecot(certs: Certs) -> Iterator[Dovecot]:
    with running_dovecot({"inbox": PASSWORD}, certs.cert_file, certs.key_file) as server:
        yield server


@pytest.fixture
def plain_dovecot(certs: Certs) -> Iterator[Dovecot]:
    """A POP3 server that offers no STLS."""
    with running_dovecot(
        {"inbox": PASSWORD}, certs.cert_file, certs.key_file, stls=False
    ) as server:
        yield server


def password_file(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pop3-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return str(path)


def pop3(port: int, security: str, secret: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "receive_connectors": {
            "pop3": [
                {
                    "name": "provider",
                    "host": "127.0.0.1",
                    "port": port,
                    "security": security,
                    "interval": 0.3,
                    "mailboxes": [
                        {"username": "inbox", "deliver_to": ["alice@example.com"], **secret}
                    ],
                    **extra,
                }
            ]
        }
    }


def tls(certs: Certs) -> dict[str, Any]:
    return {"tls": {"ca_files": [str(certs.ca_file)]}}


async def wait_mailbox(server: Dovecot, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while server.count("inbox") != count:
        assert time.monotonic() < deadline, f"{server.count('inbox')} left, not {count}"
        await asyncio.sleep(0.05)


async def test_fetch_over_pop3s_delivers_and_empties_the_mailbox(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    dovecot: Dovecot,
    certs: Certs,
    tmp_path: Path,
) -> None:
    for n in range(3):
        dovecot.deliver("inbox", message(n))
    secret = {"password_file": password_file(tmp_path / "secrets")}
    gw = await gateway_factory(**tls(certs), **pop3(dovecot.pop3s, "implicit-tls", secret))
    found = await sink.wait_for(3)
    assert sorted(m["recipients"][0] for m, _ in found) == ["alice@example.com"] * 3
    assert {m["sender"] for m, _ in found} == {"carol@elsewhere.example"}  # the Return-Path
    bodies = sorted(body for _, body in found)
    assert b"Subject: fetched 0" in bodies[0]
    assert b"\r\n.leading dot\r\n" in bodies[0]  # dot-unstuffed once, stuffed again by SMTP
    assert b"by gw.test (POP3 connector provider, TLSv1.3)" in bodies[0]
    await wait_mailbox(dovecot, 0)
    await wait_queue(gw.gateway, empty)
    await asyncio.sleep(1)  # more polls: nothing is fetched twice
    assert len(sink.messages()) == 3


async def test_fetch_over_stls_with_an_encrypted_password(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    dovecot: Dovecot,
    certs: Certs,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "gw-stls"
    token = encrypt(load_key(data_dir, create=True), PASSWORD)
    dovecot.deliver("inbox", message(1))
    gw = await gateway_factory(
        gateway={"data_dir": str(data_dir)},
        **tls(certs),
        **pop3(dovecot.pop3, "require-starttls", {"password": token}),
    )
    [(meta, body)] = await sink.wait_for(1)
    assert meta["recipients"] == ["alice@example.com"]
    assert b"(POP3 connector provider, TLSv1." in body
    await wait_mailbox(dovecot, 0)
    assert PASSWORD not in (data_dir / "pop3-state.json").read_text()
    assert (data_dir / "pop3-state.json").stat().st_mode & 0o777 == 0o600
    del gw


@pytest.mark.parametrize("security", ["require-starttls", "starttls"])
async def test_no_stls_offered_means_no_password_sent(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    plain_dovecot: Dovecot,
    certs: Certs,
    tmp_path: Path,
    security: str,
) -> None:
    plain_dovecot.deliver("inbox", message(1))
    secret = {"password_file": password_file(tmp_path / "secrets")}
    gw = await gateway_factory(**tls(certs), **pop3(plain_dovecot.pop3, security, secret))
    deadline = time.monotonic() + 10
    while gw.gateway.fetcher is None or gw.gateway.fetcher.polls < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert plain_dovecot.count("inbox") == 1
    assert sink.messages() == []
    log = plain_dovecot.log()
    assert "no auth attempts" in log  # the server saw no USER/PASS at all
    assert "inbox" not in log.replace(str(plain_dovecot.directory), "")


async def test_connector_verify_for_pop3(
    dovecot: Dovecot, plain_dovecot: Dovecot, certs: Certs, tmp_path: Path
) -> None:
    dovecot.deliver("inbox", message(1))
    secret = {"password_file": password_file(tmp_path / "secrets")}
    document: dict[str, Any] = {
        "gateway": {"hostname": "gw.test", "data_dir": str(tmp_path / "var")},
        "listeners": [{"name": "mx", "address": "127.0.0.1:2525", "security": "none"}],
        **tls(certs),
        **pop3(dovecot.pop3s, "implicit-tls", secret),
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(document))
    code, out = await run_tool(SMTPGATE, "connector", "verify", "provider", "--config", str(config))
    assert code == 0, out
    assert "ok   certificate: valid for 127.0.0.1" in out
    assert "ok   login: as inbox" in out
    assert "ok   mailbox: inbox: 1 message(s)" in out
    assert dovecot.count("inbox") == 1  # verify fetches and deletes nothing

    document |= pop3(plain_dovecot.pop3, "require-starttls", secret)
    config.write_text(yaml.safe_dump(document))
    code, out = await run_tool(SMTPGATE, "connector", "verify", "provider", "--config", str(config))
    assert code == 1, out
    assert "FAIL stls: 127.0.0.1 does not offer STLS" in out
    assert "login" not in out


class Pop3Proxy:
    """Forwards a POP3 session to Dovecot; on the first ``DELE`` the client sends,
    kills the gateway process with SIGKILL before the command is passed on."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.victim: GatewayProcess | None = None
        self.killed = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def down() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        pump = asyncio.create_task(down())
        try:
            while line := await reader.readline():
                if line.upper().startswith(b"DELE") and self.victim is not None:
                    self.victim.process.send_signal(signal.SIGKILL)
                    self.victim.process.wait()
                    self.victim, self.killed = None, self.killed + 1
                    break  # the connection dies with the process; DELE never arrives
                up_writer.write(line)
                await up_writer.drain()
        finally:
            pump.cancel()
            up_writer.close()
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()


@pytest.fixture
async def proxy(dovecot: Dovecot) -> AsyncIterator[Pop3Proxy]:
    handle = Pop3Proxy(dovecot.pop3)
    await handle.start()
    yield handle
    await handle.stop()


async def test_a_crash_between_fetch_and_delete_loses_nothing_and_delivers_once(
    gateway_process: Any,
    sink: SinkHandle,
    dovecot: Dovecot,
    proxy: Pop3Proxy,
    tmp_path: Path,
) -> None:
    for n in range(4):
        dovecot.deliver("inbox", message(n))
    secret = {"password_file": password_file(tmp_path / "secrets")}
    overrides = {**NO_SPOOF, **pop3(proxy.port, "none", secret)}  # plaintext: the proxy reads it
    # The first run cannot deliver (its next hop is down): a kill in the middle of an
    # SMTP delivery would be the queue's duplicate, not the fetch's, which is tested here.
    proxy.victim = await asyncio.to_thread(gateway_process, free_port(), **overrides)
    deadline = time.monotonic() + 20
    while not proxy.killed:  # the proxy kills it at the first DELE
        assert time.monotonic() < deadline, "the gateway never sent DELE"
        await asyncio.sleep(0.05)
    assert dovecot.count("inbox") == 4  # nothing deleted: the session died before QUIT
    again = await asyncio.to_thread(gateway_process, sink.port, **overrides)
    await wait_mailbox(dovecot, 0, timeout=20)
    found = await sink.wait_for(4)
    await asyncio.sleep(1.5)  # more polls and queue runs: a duplicate would arrive now
    subjects = sorted(
        line for _, body in sink.messages() for line in body.split(b"\r\n") if b"Subject" in line
    )
    assert subjects == [f"Subject: fetched {n}".encode() for n in range(4)], found
    assert again.stop() == 0
    # `serve` keeps the ids and the lease in its configuration store (shared by a cluster)
    store = ConfigStore.open(tmp_path / "gwp")
    try:
        kept = store.metas("pop3:")
    finally:
        store.close()
    assert sorted(k.split(":")[1] for k in kept) == ["lease", "seen"]
    assert not (tmp_path / "gwp" / "pop3-state.json").exists()


async def test_the_connectors_profile_decides_and_a_refused_message_stays(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    dovecot: Dovecot,
    certs: Certs,
    tmp_path: Path,
) -> None:
    dovecot.deliver("inbox", message(1))
    secret = {"password_file": password_file(tmp_path / "secrets")}
    blocked = {"name": "fetched", "client_hosts": ["192.0.2.1"], "relay": "blocked"}
    gw = await gateway_factory(
        **tls(certs),
        connection_profiles=[blocked],
        **pop3(dovecot.pop3s, "implicit-tls", secret, profile="fetched"),
    )
    fetcher = gw.gateway.fetcher
    assert fetcher is not None
    deadline = time.monotonic() + 10
    while fetcher.polls < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert sink.messages() == []
    assert dovecot.count("inbox") == 1  # refused: left where the operator finds it
    state = (gw.gateway.current().config.gateway.data_dir / "pop3-state.json").read_text()
    assert '"refused"' in state  # and not fetched again at every poll


async def test_a_stop_does_not_wait_for_a_silent_pop3_server(
    gateway_process: Any, sink: SinkHandle, tmp_path: Path
) -> None:
    """A server that greets and then never answers holds the fetch thread in a read
    for the socket timeout (60 s); a stop gives the fetch a few seconds, then ends
    that connection instead of waiting it out (or the 30 s shutdown grace)."""
    commands: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        await writer.drain()
        commands.append(await reader.readline())  # USER, CAPA ...: never answered
        await reader.read()  # until the client goes away

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    secret = {"password_file": password_file(tmp_path / "secrets")}
    overrides = {**NO_SPOOF, **pop3(port, "none", secret)}  # the default 30 s grace
    gateway = await asyncio.to_thread(gateway_process, sink.port, **overrides)
    try:
        deadline = time.monotonic() + 20
        while not commands:  # the fetch thread now waits for an answer
            assert time.monotonic() < deadline, "the gateway never spoke to the server"
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(gateway.stop, signal.SIGTERM, 20) == 0
    finally:
        server.close()
