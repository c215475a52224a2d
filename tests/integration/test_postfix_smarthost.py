"""A real Postfix as the smarthost, with STARTTLS and SMTP AUTH."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.queue.store import Filters, QueueStore
from tests.conftest import Certs, GatewayFactory, SinkHandle, free_port
from tests.postfix import Postfix, instance_directory


@pytest.fixture
def postfix(tmp_path: Path, sink: SinkHandle, certs: Certs) -> Iterator[Postfix]:
    instance = Postfix(
        instance_directory(),
        free_port(),
        ("127.0.0.1", sink.port),
        users={"gw@postfix.test": "smarthost-secret"},
        cert=certs.cert_file,
        key=certs.key_file,
    )
    instance.start()
    yield instance
    instance.stop()


def _connector(postfix: Postfix, password_file: Path) -> dict[str, object]:
    return {
        "name": "isp",
        "security": "require-starttls",
        "deliver": {
            "smarthost": {
                "host": "127.0.0.1",
                "port": postfix.port,
                "username": "gw@postfix.test",
                "password_file": str(password_file),
            }
        },
    }


def _secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            "bob@example.org",
            ["alice@example.com"],
            b"Subject: via postfix\r\nMessage-ID: <pf-1@test>\r\n\r\nhello\r\n",
        )


async def test_delivery_through_postfix_with_auth_over_starttls(
    gateway_factory: GatewayFactory, sink: SinkHandle, postfix: Postfix, tmp_path: Path
) -> None:
    secret = _secret(tmp_path / "isp.pw", "smarthost-secret")
    gw = await gateway_factory(spoof_detection=False, send_connectors=[_connector(postfix, secret)])
    await asyncio.to_thread(_send, gw.port)
    [(meta, body)] = await sink.wait_for(1, timeout=30)
    assert meta["recipients"] == ["alice@example.com"]
    assert b"by postfix.test (Postfix) with ESMTPSA" in body  # TLS and AUTH at Postfix
    assert b"by gw.test (smtpgate)" in body
    assert "sasl_username=gw@postfix.test" in postfix.log()


async def test_wrong_smarthost_password_defers_and_nothing_arrives(
    gateway_factory: GatewayFactory, sink: SinkHandle, postfix: Postfix, tmp_path: Path
) -> None:
    secret = _secret(tmp_path / "isp.pw", "wrong")
    gw = await gateway_factory(spoof_detection=False, send_connectors=[_connector(postfix, secret)])
    await asyncio.to_thread(_send, gw.port)
    await asyncio.sleep(1.5)
    assert sink.messages() == []
    store = QueueStore(tmp_path / "gw0" / "queue")
    try:
        [message] = list(store.list(Filters()))
    finally:
        store.close()
    assert message.recipients[0].state == "deferred"
    assert "AUTH" in (message.recipients[0].last_reply or "")
    assert "smarthost-secret" not in (message.recipients[0].last_reply or "")


async def test_postfix_requiring_a_client_certificate_gets_the_connectors_identity(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs, tmp_path: Path
) -> None:
    client = certs.ca.issue_cert("gw-client.test")
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    client_key.chmod(0o600)
    postfix = Postfix(
        instance_directory(),
        free_port(),
        ("127.0.0.1", sink.port),
        cert=certs.cert_file,
        key=certs.key_file,
        ca_file=certs.ca_file,
        require_client_cert=True,
    )
    postfix.start()
    try:
        connector = {
            "name": "partner",
            "security": "require-starttls",
            "deliver": {"smarthost": {"host": "127.0.0.1", "port": postfix.port}},
        }
        without = await gateway_factory(spoof_detection=False, send_connectors=[connector])
        await asyncio.to_thread(_send, without.port)
        await asyncio.sleep(1.5)
        assert sink.messages() == []  # Postfix refuses mail without a client certificate
        with_identity = await gateway_factory(
            spoof_detection=False,
            certificates=[{"name": "me", "cert": str(client_cert), "key": str(client_key)}],
            send_connectors=[{**connector, "client_certificate": "me"}],
        )
        await asyncio.to_thread(_send, with_identity.port)
        [(_, body)] = await sink.wait_for(1, timeout=30)
        assert b"by postfix.test (Postfix) with ESMTPS" in body
    finally:
        postfix.stop()
