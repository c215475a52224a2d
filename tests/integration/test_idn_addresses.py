"""Internationalised domains end to end: a real client, the in-process gateway
and a next hop that records the command lines exactly as they arrived.

The recording sink runs on our own protocol core, which normalises addresses
too; so the next hop here is a few lines of raw SMTP that keep the bytes.
"""

# ruff: noqa: RUF001 - fullwidth letters and other confusables are the test data

from __future__ import annotations

import asyncio
import smtplib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import GatewayFactory, GatewayHandle


@dataclass
class RawHop:
    """A next hop that accepts everything and keeps every command line."""

    lines: list[str] = field(default_factory=list)
    messages: int = 0
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        while line := await reader.readline():
            text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
            self.lines.append(text)
            verb = text[:4].upper()
            if verb == "EHLO":
                writer.write(b"250-raw.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
            elif verb == "DATA":
                writer.write(b"354 go ahead\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                self.messages += 1
                writer.write(b"250 2.0.0 stored\r\n")
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
        writer.close()

    def envelope_lines(self) -> list[str]:
        return [line for line in self.lines if line[:4].upper() in ("MAIL", "RCPT")]

    async def wait_for(self, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.messages < count and time.monotonic() < deadline:  # noqa: ASYNC110 - counted by another connection
            await asyncio.sleep(0.05)


@pytest.fixture
async def hop() -> AsyncIterator[RawHop]:
    recorder = RawHop()
    server = await asyncio.start_server(recorder.serve, "127.0.0.1", 0)
    recorder.port = server.sockets[0].getsockname()[1]
    yield recorder
    server.close()


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, hop: RawHop) -> GatewayHandle:
    """Hosted: example.com, strasse.example, bücher.example and its sub-domains."""
    return await gateway_factory(
        hosted_domains=["example.com", "strasse.example", "Bücher.example", "sub.bücher.example"],
        send_connectors=[
            {
                "name": "to-raw",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": hop.port}},
                "security": "none",
                "namespaces": [
                    {"sender": "*", "recipient": "example.com"},
                    {"sender": "*", "recipient": "strasse.example"},
                    {"sender": "*", "recipient": "bücher.example"},
                    {"sender": "*", "recipient": "*.bücher.example"},
                ],
            }
        ],
    )


def _transaction(
    port: int, sender: str, recipients: list[str], *, smtputf8: bool = True
) -> tuple[tuple[int, bytes], list[tuple[int, bytes]]]:
    """MAIL, each RCPT and (if any was accepted) DATA; the client's replies."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        mail = client.mail(sender, ["SMTPUTF8"] if smtputf8 else [])
        replies = [client.rcpt(r) for r in recipients] if mail[0] == 250 else []
        if any(code == 250 for code, _ in replies):
            assert client.data(b"Subject: idn\r\n\r\nhi\r\n")[0] == 250
        return mail, replies


async def test_unicode_spellings_of_a_hosted_domain_reach_the_next_hop_in_normal_form(
    gw: GatewayHandle, hop: RawHop
) -> None:
    recipients = [
        "alice@ｅｘａｍｐｌｅ.com",  # fullwidth
        "bob@example。com",  # ideographic full stop
        "carol@exam\u00adple.com",  # soft hyphen
        "dave@EXAMPLE.COM",
        "jörg@Bücher.example",
        "zoë@sub.xn--bcher-kva.example",  # namespace *.bücher.example
    ]
    mail, replies = await asyncio.to_thread(
        _transaction, gw.port, "sender@ＥＬＳＥＷＨＥＲＥ.example", recipients
    )
    assert mail[0] == 250
    assert [code for code, _ in replies] == [250] * len(recipients), replies
    await hop.wait_for(1)
    assert hop.envelope_lines() == [
        "MAIL FROM:<sender@elsewhere.example> SMTPUTF8",
        "RCPT TO:<alice@example.com>",
        "RCPT TO:<bob@example.com>",
        "RCPT TO:<carol@example.com>",
        "RCPT TO:<dave@example.com>",
        "RCPT TO:<jörg@xn--bcher-kva.example>",
        "RCPT TO:<zoë@sub.xn--bcher-kva.example>",
    ]


async def test_an_a_label_recipient_matches_a_unicode_namespace_without_smtputf8(
    gw: GatewayHandle, hop: RawHop
) -> None:
    recipient = "x@sub.xn--bcher-kva.example"
    _, replies = await asyncio.to_thread(
        _transaction, gw.port, "a@elsewhere.example", [recipient], smtputf8=False
    )
    assert [code for code, _ in replies] == [250]
    await hop.wait_for(1)
    assert hop.envelope_lines() == [
        "MAIL FROM:<a@elsewhere.example>",
        "RCPT TO:<x@sub.xn--bcher-kva.example>",
    ]


async def test_eszett_is_not_a_spelling_of_ss_and_is_not_relayed(
    gw: GatewayHandle, hop: RawHop
) -> None:
    _, replies = await asyncio.to_thread(
        _transaction, gw.port, "a@elsewhere.example", ["victim@straße.example"]
    )
    [(code, text)] = replies
    assert (code, text[:5]) == (554, b"5.7.1")
    assert b"xn--strae-oqa.example" in text  # the reply names what was decided on
    await asyncio.sleep(0.5)
    assert hop.lines == []  # nothing reached the next hop


@pytest.mark.parametrize(
    ("recipient", "smtputf8"),
    [
        ("x@a\u2764.example", True),  # a code point IDNA 2008 disallows
        ("x@bü_cher.example", True),
        ("x@xn--ls8h.example", False),  # the A-label of a disallowed code point
        ("x@xn---bbk.example", False),  # a non-canonical A-label
        ("x@-example.com", False),
    ],
)
async def test_domains_idna2008_refuses_get_501_with_an_enhanced_code(
    gw: GatewayHandle, hop: RawHop, recipient: str, smtputf8: bool
) -> None:
    sender = "a@elsewhere.example"
    _, [(code, text)] = await asyncio.to_thread(
        _transaction, gw.port, sender, [recipient], smtputf8=smtputf8
    )
    assert (code, text[:5]) == (501, b"5.1.3"), text
    # As the sender, the same domain is refused with 5.1.7, and the session goes on.
    refused, _ = await asyncio.to_thread(
        _transaction, gw.port, recipient.replace("x@", "s@"), [], smtputf8=smtputf8
    )
    assert (refused[0], refused[1][:5]) == (501, b"5.1.7"), refused
    assert hop.lines == []


async def test_a_unicode_spelling_of_a_hosted_sender_domain_is_spoofing(
    gw: GatewayHandle,
) -> None:
    mail, _ = await asyncio.to_thread(_transaction, gw.port, "ceo@ｅｘａｍｐｌｅ.com", [])
    assert (mail[0], mail[1][:5]) == (553, b"5.7.1")
    mail, _ = await asyncio.to_thread(_transaction, gw.port, "ceo@Sub.Bücher.example", [])
    assert (mail[0], mail[1][:5]) == (553, b"5.7.1")


async def test_raw_bytes_of_a_bad_idn_get_a_reply_not_a_dropped_connection(
    gw: GatewayHandle,
) -> None:
    def talk() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
            stream = conn.makefile("rwb")
            stream.readline()
            replies = []
            for line in (
                b"EHLO client.example",
                b"MAIL FROM:<a@elsewhere.example> SMTPUTF8",
                "RCPT TO:<x@\u0301a.example>".encode(),  # a combining mark first
                "RCPT TO:<x@a\u200db.example>".encode(),  # ZWJ out of context
                b"RCPT TO:<x@\xff.example>",  # not UTF-8 at all: the core's own reply
                b"NOOP",
            ):
                stream.write(line + b"\r\n")
                stream.flush()
                reply = stream.readline()
                while reply[3:4] == b"-":
                    reply = stream.readline()
                replies.append(reply)
            return replies

    replies = await asyncio.to_thread(talk)
    assert [r[:9] for r in replies[2:]] == [b"501 5.1.3", b"501 5.1.3", b"500 5.5.2", b"250 2.0.0"]
