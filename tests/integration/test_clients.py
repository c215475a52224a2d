"""Real clients (Python's smtplib, swaks) through the gateway to a real sink."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage

import pytest

from tests.conftest import Certs, GatewayFactory, GatewayHandle, SinkHandle, run_tool


def _send(port: int, message: EmailMessage, *, reuse: int = 1, host: str = "127.0.0.1") -> None:
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("client.example")
        for _ in range(reuse):
            client.send_message(message)


def _message(to: str = "alice@example.com", body: str = "Hello.\n.leading dot\n") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@elsewhere.example"
    message["To"] = to
    message["Subject"] = "test"
    message.set_content(body)
    return message


async def test_smtplib_message_arrives_at_the_sink_with_a_trace_header(
    gateway: GatewayHandle, sink: SinkHandle
) -> None:
    await asyncio.to_thread(_send, gateway.port, _message())
    [(meta, body)] = await sink.wait_for(1)
    assert meta["sender"] == "sender@elsewhere.example"
    assert meta["recipients"] == ["alice@example.com"]
    assert b"\r\n.leading dot\r\n" in body
    assert b"by gw.test (smtpgate) with ESMTP id " in body
    assert b"for <alice@example.com>" in body


async def test_connection_reuse_delivers_every_message(
    gateway: GatewayHandle, sink: SinkHandle
) -> None:
    await asyncio.to_thread(_send, gateway.port, _message(), reuse=5)
    assert len(await sink.wait_for(5)) == 5


async def test_smtputf8_addresses_pass_through(gateway: GatewayHandle, sink: SinkHandle) -> None:
    def send() -> None:
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
            client.ehlo("client.example")
            client.sendmail(
                "jörg@bücher.example",
                ["zoë@example.com"],
                b"Subject: utf8\r\n\r\nhi\r\n",
                mail_options=["SMTPUTF8"],
            )

    await asyncio.to_thread(send)
    [(meta, _)] = await sink.wait_for(1)
    assert meta["recipients"] == ["zoë@example.com"]
    assert meta["sender"] == "jörg@xn--bcher-kva.example"  # the domain as an A-label


async def test_ipv6_listener(gateway_factory: GatewayFactory, sink: SinkHandle) -> None:
    gw = await gateway_factory(listeners=[{"name": "mx", "address": "[::1]:0", "security": "none"}])
    await asyncio.to_thread(_send, gw.port, _message(), host="::1")
    [(meta, body)] = await sink.wait_for(1)
    assert meta["recipients"] == ["alice@example.com"]
    assert b"[IPv6:::1]" in body


async def test_foreign_recipient_is_refused_and_nothing_is_relayed(
    gateway: GatewayHandle, sink: SinkHandle
) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        await asyncio.to_thread(_send, gateway.port, _message(to="victim@foreign.example"))
    code, text = caught.value.recipients["victim@foreign.example"]
    assert code == 554
    assert b"5.7.1" in text
    assert await sink.wait_for(1, timeout=1.5) == []  # nothing arrives, even later


async def test_swaks_plain_and_pipelined(
    gateway: GatewayHandle, sink: SinkHandle, swaks: str
) -> None:
    for extra in ([], ["--pipeline"]):
        code, out = await run_tool(
            swaks,
            "--server",
            f"127.0.0.1:{gateway.port}",
            "--to",
            "alice@example.com",
            "--from",
            "bob@elsewhere.example",
            "--helo",
            "client.example",
            *extra,
        )
        assert code == 0, out
        assert "250 2.0.0 Ok: queued as" in out
    assert len(await sink.wait_for(2)) == 2


async def test_swaks_relay_attempt_is_refused(
    gateway: GatewayHandle, sink: SinkHandle, swaks: str
) -> None:
    code, out = await run_tool(
        swaks,
        "--server",
        f"127.0.0.1:{gateway.port}",
        "--to",
        "victim@foreign.example",
    )
    assert code != 0
    assert "554 5.7.1 <victim@foreign.example>: Relay access denied" in out
    assert await sink.wait_for(1, timeout=1.5) == []  # nothing arrives, even later


def _tls_listener(security: str, certs: Certs) -> dict[str, object]:
    return {
        "listeners": [
            {"name": "mx", "address": "127.0.0.1:0", "security": security, "certificate": "gw"}
        ],
        "certificates": [{"name": "gw", "cert": str(certs.cert_file), "key": str(certs.key_file)}],
    }


@pytest.mark.parametrize(
    ("security", "flag"), [("starttls", "--tls"), ("implicit-tls", "--tls-on-connect")]
)
async def test_swaks_over_tls(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    swaks: str,
    certs: Certs,
    security: str,
    flag: str,
) -> None:
    gw = await gateway_factory(**_tls_listener(security, certs))
    code, out = await run_tool(
        swaks, "--server", f"127.0.0.1:{gw.port}", "--to", "alice@example.com", flag
    )
    assert code == 0, out
    assert "TLS started" in out
    [(_, body)] = await sink.wait_for(1)
    assert b"with ESMTPS id" in body
    assert b"(using TLSv1." in body


async def test_require_starttls_refuses_mail_in_the_clear(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs
) -> None:
    gw = await gateway_factory(**_tls_listener("require-starttls", certs))

    def attempt() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.ehlo("client.example")
            refused = client.mail("a@elsewhere.example")
            context = ssl.create_default_context(cafile=str(certs.ca_file))
            client.starttls(context=context)
            client.ehlo("client.example")
            client.sendmail(
                "a@elsewhere.example", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n"
            )
            return refused

    code, text = await asyncio.to_thread(attempt)
    assert code == 530
    assert text.startswith(b"5.7.0")
    assert len(await sink.wait_for(1)) == 1


async def test_starttls_injection_is_discarded(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs
) -> None:
    """CVE-2011-0411: commands pipelined with STARTTLS must not run after TLS."""
    gw = await gateway_factory(**_tls_listener("starttls", certs))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await reader.readline()
    writer.write(b"EHLO client.example\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    writer.write(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
    assert (await reader.readline()).startswith(b"220 2.0.0")
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    await writer.start_tls(context, server_hostname="gw.test")
    writer.write(b"NOOP\r\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"250 2.0.0 Ok\r\n"
    writer.close()
