"""Recipient validation at RCPT with a real ``smtpgate serve``.

The internal mail server is a real SMTP server on loopback (aiosmtpd, in the
test's loop) that knows some users and refuses the others with 550 5.1.1; it
counts its connections, so a cached answer is seen as no new connection.
``example.com`` is validated by callout to it, ``example.org`` by a list
(inline and a file) and ``example.net`` by callout to a port where nothing
listens; one test validates ``example.org`` in a private slapd instead.
What is asserted is what a client notices: the reply to each RCPT, in
order, and what arrives at the internal server (or the sink).
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import GatewayProcess, SinkHandle, free_port
from tests.slapd import MANAGER, PASSWORD, SUFFIX, person, running_slapd

SENDER = "someone@sender.test"  # outside: hosted senders from outside are spoofing


@dataclass
class Internal:
    """An internal mail server that knows ``users`` (what a callout probes)."""

    users: set[str]
    connections: int = 0
    rcpts: list[str] = field(default_factory=list)
    messages: list[tuple[list[str], bytes]] = field(default_factory=list)

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.rcpts.append(address)
        if address.lower() not in self.users:
            return "550 5.1.1 <%s>: no such user here" % address  # noqa: UP031
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        self.messages.append((list(envelope.rcpt_tos), content))
        return "250 2.0.0 Ok: stored"


@pytest.fixture
async def internal() -> AsyncIterator[tuple[Internal, int]]:
    server_state = Internal({"alice@example.com", "bob@example.com"})

    class Counting(SMTP):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            server_state.connections += 1
            super().connection_made(transport)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Counting(server_state, hostname="internal.test"), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    yield server_state, port
    server.close()
    await server.wait_closed()


@pytest.fixture
def gateway(
    gateway_process: Callable[..., GatewayProcess],
    sink: SinkHandle,
    internal: tuple[Internal, int],
    tmp_path: Path,
) -> tuple[GatewayProcess, Path]:
    _, port = internal
    listed = tmp_path / "recipients.txt"
    listed.write_text("# the people at example.org\ncarol\nDan@Example.org\n")
    process = gateway_process(
        sink.port,
        gateway={"workers": 1},  # an outage is logged once per worker: the tests count lines
        hosted_domains=["example.com", "example.org", "example.net"],
        send_connectors=[
            _connector("internal", port, "example.com"),
            _connector("to-sink", sink.port, "example.org"),
            _connector("dead", free_port(), "example.net"),
        ],
        recipient_validation=[
            {"domain": "example.com", "mode": "callout", "callout": {"timeout": 5}},
            {
                "domain": "example.org",
                "mode": "list",
                "recipients": ["postoffice"],
                "recipients_file": str(listed),
            },
            {"domain": "example.net", "mode": "callout", "callout": {"timeout": 3}},
        ],
    )
    return process, listed


def _connector(name: str, port: int, domain: str) -> dict[str, Any]:
    return {
        "name": name,
        "deliver": {"smarthost": {"host": "127.0.0.1", "port": port}},
        "security": "none",
        "namespaces": [{"sender": "*", "recipient": domain}],
    }


def _rcpts(port: int, recipients: list[str]) -> list[tuple[int, str]]:
    """Each recipient's reply, in one session (no DATA)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        replies = [client.rcpt(r) for r in recipients]
    return [(code, text.decode()) for code, text in replies]


async def rcpts(port: int, recipients: list[str]) -> list[tuple[int, str]]:
    return await asyncio.to_thread(_rcpts, port, recipients)


def _pipelined(port: int, recipients: list[str]) -> list[str]:
    """MAIL and every RCPT in one write (RFC 2920); the reply lines as they came."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO client.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        batch = f"MAIL FROM:<{SENDER}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in recipients)
        sock.sendall(batch.encode())
        answers = [reader.readline().decode().rstrip() for _ in range(len(recipients) + 1)]
        sock.sendall(b"QUIT\r\n")
        return answers[1:]


async def wait_for(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 - another process
        await asyncio.sleep(0.05)
    assert condition()


async def test_callout_refuses_unknown_and_delivers_to_known(
    gateway: tuple[GatewayProcess, Path], internal: tuple[Internal, int]
) -> None:
    process, _ = gateway
    server, _ = internal
    replies = await rcpts(process.port, ["nobody@example.com", "alice@example.com"])
    assert replies[0] == (
        550,
        "5.1.1 <nobody@example.com>: Recipient address rejected: user unknown",
    )
    assert replies[1][0] == 250

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", process.port, timeout=30) as client:
            return client.sendmail(
                SENDER,
                ["Alice@example.com", "ghost@example.com"],
                b"Subject: hello\r\nMessage-ID: <rv1@sender.test>\r\n\r\nfor alice\r\n",
            )

    refused = await asyncio.to_thread(send)
    assert refused == {
        "ghost@example.com": (
            550,
            b"5.1.1 <ghost@example.com>: Recipient address rejected: user unknown",
        )
    }
    await wait_for(lambda: len(server.messages) == 1)
    recipients, content = server.messages[0]
    assert recipients == ["Alice@example.com"]
    assert b"for alice" in content
    assert len(server.messages) == 1  # probes never send DATA


async def test_callout_results_are_cached(
    gateway: tuple[GatewayProcess, Path], internal: tuple[Internal, int]
) -> None:
    process, _ = gateway
    server, _ = internal
    assert (await rcpts(process.port, ["bob@example.com", "eve@example.com"]))[0][0] == 250
    probed = server.connections
    assert probed == 2  # one callout per address
    replies = await rcpts(process.port, ["BOB@example.com", "eve@example.com"])
    assert [code for code, _ in replies] == [250, 550]
    assert server.connections == probed  # both answers came from the cache
    assert server.rcpts == ["bob@example.com", "eve@example.com"]


async def test_pipelined_rcpts_keep_their_order(
    gateway: tuple[GatewayProcess, Path], internal: tuple[Internal, int]
) -> None:
    process, _ = gateway
    answers = await asyncio.to_thread(
        _pipelined,
        process.port,
        [
            "alice@example.com",
            "nobody@example.com",
            "carol@example.org",
            "mallory@example.org",
            "bob@example.com",
            "postmaster@example.com",
        ],
    )
    assert [a[:9] for a in answers] == [
        "250 2.1.5",
        "550 5.1.1",
        "250 2.1.5",
        "550 5.1.1",
        "250 2.1.5",
        "250 2.1.5",
    ]
    assert "<nobody@example.com>" in answers[1]


async def test_callout_server_down_is_451_never_250(gateway: tuple[GatewayProcess, Path]) -> None:
    process, _ = gateway
    for _ in range(2):  # a temporary failure is not cached: still 451, never 250
        replies = await rcpts(process.port, ["anyone@example.net"])
        assert replies == [
            (451, "4.4.3 <anyone@example.net>: recipient verification temporarily unavailable")
        ]
    process.stop()
    _, err = process.process.communicate(timeout=30)
    assert err.decode().count("recipient check destination down") == 1  # once per outage


async def test_list_domain_and_its_file_changing(gateway: tuple[GatewayProcess, Path]) -> None:
    process, listed = gateway
    replies = await rcpts(
        process.port,
        ["carol@example.org", "dan@example.org", "postoffice@example.org", "frank@example.org"],
    )
    assert [code for code, _ in replies] == [250, 250, 250, 550]
    assert replies[3][1] == "5.1.1 <frank@example.org>: Recipient address rejected: user unknown"
    listed.write_text("frank\n# carol left\n")
    replies = await rcpts(process.port, ["frank@example.org", "carol@example.org"])
    assert [code for code, _ in replies] == [250, 550]


async def test_ldap_domain(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle, tmp_path: Path
) -> None:
    """``example.org`` validated in a private slapd: found → 250 and delivered, not
    found → 550 5.1.1; the directory stopped → 451 for an address not cached."""
    secret = tmp_path / "ldap.secret"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    with running_slapd(person("carol", "carol@example.org")) as directory:
        ldap = {
            "url": directory.url,
            "bind_dn": MANAGER,
            "password_file": str(secret),
            "base": f"ou=people,{SUFFIX}",
            "filter": "(|(mail={address})(uid={local}))",
            "timeout": 3,
        }
        process = gateway_process(
            sink.port,
            gateway={"workers": 1},  # the cache below is each worker's own
            recipient_validation=[{"domain": "example.org", "mode": "ldap", "ldap": ldap}],
        )
        replies = await rcpts(process.port, ["carol@example.org", "mallory@example.org"])
        assert replies == [
            (250, "2.1.5 Ok"),
            (550, "5.1.1 <mallory@example.org>: Recipient address rejected: user unknown"),
        ]

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", process.port, timeout=30) as client:
                return client.sendmail(
                    SENDER, ["carol@example.org"], b"Subject: hi\r\n\r\nfor carol\r\n"
                )

        assert await asyncio.to_thread(send) == {}
        [(envelope, _)] = await sink.wait_for(1)
        assert envelope["recipients"] == ["carol@example.org"]
    replies = await rcpts(process.port, ["carol@example.org", "dave@example.org"])
    assert replies == [
        (250, "2.1.5 Ok"),  # cached
        (451, "4.4.3 <dave@example.org>: recipient verification temporarily unavailable"),
    ]


async def test_directories_that_do_not_answer_hold_none_of_the_shared_threads(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle, tmp_path: Path
) -> None:
    """Two directories that take connections and never answer, eight lookups
    hanging at once: the gateway's own work on the shared threads (here its
    heartbeat, which ``/readyz`` reads) goes on meanwhile, because lookups run
    on threads of their own. Each hanging lookup ends in 451, never 250."""
    holes = []
    for _ in range(2):
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # connections complete in the kernel; nothing is ever read
        holes.append(hole)

    def directory(hole: socket.socket) -> dict[str, Any]:
        url = f"ldap://127.0.0.1:{hole.getsockname()[1]}"
        return {"url": url, "base": "dc=example", "timeout": 8, "concurrency": 4}

    try:
        process = gateway_process(
            sink.port,
            gateway={"workers": 1},
            recipient_validation=[
                {"domain": "example.org", "mode": "ldap", "ldap": directory(holes[0])},
                {"domain": "example.com", "mode": "ldap", "ldap": directory(holes[1])},
            ],
        )
        health = tmp_path / "gwp" / "health.json"
        addresses = [f"u{n}@example.{'org' if n % 2 else 'com'}" for n in range(8)]
        lookups = [asyncio.create_task(rcpts(process.port, [a])) for a in addresses]
        await asyncio.sleep(1.5)  # every lookup is hanging now
        before = json.loads(health.read_text())["now"]
        deadline = time.monotonic() + 5
        while json.loads(health.read_text())["now"] == before:
            assert time.monotonic() < deadline, "the heartbeat stopped while lookups hang"
            await asyncio.sleep(0.1)
        replies = await asyncio.gather(*lookups)
    finally:
        for hole in holes:
            hole.close()
    assert all(code == 451 for [(code, _)] in replies), replies
