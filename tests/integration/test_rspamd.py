"""Spam scanning by rspamd: a private rspamd, a real ``smtpgate serve``, a sink.

What a user notices: the SMTP reply the client got, what arrived at the sink
and the ``X-Spam-*`` fields it carries. GTUBE is rejected where the profile
decided on a spam check (relay none, the default) and delivered where it did
not (relay full); a clean message arrives with its ``X-Spam-Status``; with
rspamd stopped, fail-open delivers marked "unchecked" and fail-closed answers
451 until rspamd is back. The action mapping is tested on canned replies.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import Callable
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from smtpgate.config import parse_config
from smtpgate.config.schema import RspamdSettings
from smtpgate.content.pipeline import MessageFacts
from smtpgate.content.quarantine import QuarantineStore, quarantine_dir
from smtpgate.content.rspamd import (
    RspamdError,
    RspamdScanner,
    request_headers,
    subject_prefix,
    verdict,
)
from smtpgate.errors import ConfigError
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.policy.explain import Facts, explain
from smtpgate.policy.profile import ProfileIndex
from smtpgate.spool import SpooledBody
from tests.conftest import GatewayProcess, SinkHandle, base_config, merge
from tests.rspamd import GTUBE, Rspamd, rspamd_fixture  # noqa: F401 - the fixture

PARTNER = {"name": "partner", "client_hosts": ["127.0.0.2"], "relay": "full"}


def message(body: str, subject: str = "hello") -> bytes:
    return (
        f"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{abs(hash(body))}@sender.test>\r\n"
        f"Date: Sun, 29 Nov 2026 12:00:00 +0000\r\n\r\n{body}\r\n"
    ).encode()


def send(port: int, data: bytes, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """One message; the reply to the end of DATA (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as client:
        client.ehlo("client.sender.test")
        client.mail("alice@sender.test")
        client.rcpt("bob@example.com")
        return client.data(data)


def start(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle, rspamd: Rspamd, **extra: Any
) -> GatewayProcess:
    settings = {"url": rspamd.url, "timeout": 10, **extra}
    # one worker: an outage is logged once per worker process, and the tests count the lines
    return gateway_process(
        sink.port, connection_profiles=[PARTNER], spam={"rspamd": settings}, gateway={"workers": 1}
    )


async def test_gtube_refused_where_the_profile_checks_and_delivered_where_not(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle, rspamd: Rspamd
) -> None:
    gw = start(gateway_process, sink, rspamd)
    code, text = await asyncio.to_thread(send, gw.port, message(GTUBE))
    assert code == 550
    assert text.startswith(b"5.7.1 ")
    assert b"Gtube pattern" in text  # rspamd's own message

    code, _ = await asyncio.to_thread(send, gw.port, message(GTUBE), "127.0.0.2")
    assert code == 250
    (_meta, body), *rest = await sink.wait_for(1)
    assert not rest, "the refused GTUBE reached the sink"
    assert GTUBE.encode() in body
    assert b"X-Spam-" not in body  # the partner's mail was not scanned


async def test_clean_and_large_messages_delivered_with_their_status(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle, rspamd: Rspamd
) -> None:
    gw = start(gateway_process, sink, rspamd)
    code, _ = await asyncio.to_thread(send, gw.port, message("Lunch at noon?"))
    assert code == 250
    line = "The quarterly figures are attached, as discussed in the meeting.\r\n"
    big = message(line * (2 * 1024 * 1024 // len(line)), subject="figures")
    assert len(big) > 2_000_000
    code, _ = await asyncio.to_thread(send, gw.port, big)
    assert code == 250
    found = await sink.wait_for(2)
    assert len(found) == 2
    for _meta, body in found:
        parsed = message_from_bytes(body)
        assert parsed["X-Spam-Status"].startswith("No, score="), parsed["X-Spam-Status"]
        assert parsed["X-Spam-Score"] is not None
        assert parsed["X-Spam-Flag"] is None
    assert len(found[1][1]) > 2_000_000


async def test_rspamd_down_fail_open_delivers_unchecked(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle, rspamd: Rspamd
) -> None:
    gw = start(gateway_process, sink, rspamd, fail="open")
    rspamd.stop()
    try:
        code, _ = await asyncio.to_thread(send, gw.port, message("while rspamd is away"))
        assert code == 250
        (_meta, body), *_ = await sink.wait_for(1)
        parsed = message_from_bytes(body)
        assert parsed["X-Spam-Status"] == "unchecked (rspamd unreachable)"
    finally:
        rspamd.start()


async def test_rspamd_down_fail_closed_defers_until_it_is_back(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle, rspamd: Rspamd
) -> None:
    gw = start(gateway_process, sink, rspamd, fail="closed")
    data = message("deferred, then delivered")
    rspamd.stop()
    try:
        for _attempt in range(2):
            code, text = await asyncio.to_thread(send, gw.port, data)
            assert code == 451
            assert text.startswith(b"4.7.1 ")
            assert b"try again later" in text
        assert sink.messages() == []
    finally:
        rspamd.start()
    code, _ = await asyncio.to_thread(send, gw.port, data)  # the client's retry
    assert code == 250
    (_meta, body), *_ = await sink.wait_for(1)
    assert message_from_bytes(body)["X-Spam-Status"].startswith("No, ")
    gw.stop()
    assert gw.process.stderr is not None
    log = gw.process.stderr.read().decode()
    assert log.count("rspamd unreachable") == 1, log  # once per outage, not per message


async def test_score_over_quarantine_score_is_held_not_delivered(
    gateway_process: Callable[..., GatewayProcess],
    sink: SinkHandle,
    rspamd: Rspamd,
    tmp_path: Path,
) -> None:
    gw = start(gateway_process, sink, rspamd, quarantine_score=-100)
    code, _ = await asyncio.to_thread(send, gw.port, message("held for review"))
    assert code == 250  # the client hears 250: the message is kept, not refused
    gw.stop()
    assert sink.messages() == []
    (held,) = QuarantineStore(quarantine_dir(tmp_path / "gwp")).entries()
    assert "rspamd: quarantine" in held.summary


# -- the scanner on its own: canned replies, headers sent, a confused server ------


SETTINGS = RspamdSettings(url="http://127.0.0.1:1", quarantine_score=10.0)


def reply(action: str, score: float = 5.0, **extra: Any) -> dict[str, Any]:
    symbols = {
        "GTUBE": {"name": "GTUBE", "score": 0.0},
        "BAYES_SPAM": {"name": "BAYES_SPAM", "score": 5.1},
        "MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1},
    }
    return {"action": action, "score": score, "required_score": 15.0, "symbols": symbols, **extra}


def test_reject_is_550_with_rspamd_message_sanitised_and_bounded() -> None:
    said = {"smtp_message": "Spam\r\n250 fake " + "x" * 500}
    result = verdict(reply("reject", 16, messages=said), SETTINGS)
    assert result.action == "reject"
    assert result.reply is not None
    assert (result.reply.code, result.reply.status) == (550, "5.7.1")
    (line,) = result.reply.lines
    assert "\r" not in line
    assert "\n" not in line
    assert len(line) <= 200
    plain = verdict(reply("reject", 16), SETTINGS)
    assert plain.reply is not None
    assert plain.reply.lines == ("Message rejected as spam",)


@pytest.mark.parametrize("action", ["soft reject", "greylist"])
def test_soft_reject_and_greylist_are_451(action: str) -> None:
    result = verdict(reply(action), SETTINGS)
    assert result.action == "tempfail"
    assert result.reply is not None
    assert (result.reply.code, result.reply.status) == (451, "4.7.1")


def test_add_header_marks_the_message() -> None:
    result = verdict(reply("add header", 7.3), SETTINGS)
    fields = dict(result.headers)
    assert result.action == "accept"
    assert fields["X-Spam-Flag"] == "YES"
    assert fields["X-Spam-Score"] == "7.30"
    assert fields["X-Spam-Status"] == "Yes, score=7.30 required=15.00 action=add header"
    assert fields["X-Spam-Symbols"].startswith("BAYES_SPAM(5.10), MIME_GOOD(-0.10)")


def test_no_action_says_it_was_scanned_and_headers_off_says_nothing() -> None:
    result = verdict(reply("no action", 1.0), SETTINGS)
    assert result.action == "accept"
    assert [name for name, _ in result.headers] == ["X-Spam-Status", "X-Spam-Score"]
    quiet = RspamdSettings(headers=False)
    assert verdict(reply("add header", 7.3), quiet).headers == ()


def test_rewrite_subject_prefix_from_rspamd_subject() -> None:
    said = reply("rewrite subject", 8, subject="*** SPAM *** Cheap watches")
    result = verdict(said, SETTINGS, "Cheap watches")
    assert result.subject_prefix == "*** SPAM ***"
    assert verdict(reply("rewrite subject", 8), SETTINGS).subject_prefix == "[SPAM]"
    assert subject_prefix("[X] other", "Cheap watches") == "[SPAM]"


def test_quarantine_score_holds_and_reject_stays_reject() -> None:
    assert verdict(reply("add header", 12.0), SETTINGS).action == "quarantine"
    assert verdict(reply("add header", 9.9), SETTINGS).action == "accept"
    assert verdict(reply("reject", 20.0), SETTINGS).action == "reject"
    assert verdict(reply("add header", 99), RspamdSettings()).action == "accept"


def test_unknown_action_is_not_a_verdict() -> None:
    with pytest.raises(RspamdError):
        verdict(reply("burn it"), SETTINGS)


def facts() -> MessageFacts:
    envelope = Envelope(
        "alice@sender.test",
        (Recipient("bob@example.com"), Recipient("carol@example.org")),
        helo="client.sender.test",
        client_ip="192.0.2.7",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
        auth_user="alice",
    )
    return MessageFacts("Q1", envelope, "gw.test", client_name="client.sender.test")


def test_request_headers_carry_the_envelope_and_session(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    sent = request_headers(facts(), secret)
    assert [v for k, v in sent if k == "Rcpt"] == [b"bob@example.com", b"carol@example.org"]
    named = dict(sent)
    assert named["IP"] == b"192.0.2.7"
    assert named["Helo"] == b"client.sender.test"
    assert named["Hostname"] == b"client.sender.test"
    assert named["User"] == b"alice"
    assert named["TLS-Version"] == b"TLSv1.3"
    assert named["TLS-Cipher"] == b"TLS_AES_256_GCM_SHA384"
    assert named["MTA-Name"] == b"gw.test"
    assert named["Queue-Id"] == b"Q1"
    assert named["Password"] == b"s3cret"


async def test_garbage_from_the_server_is_unreachable_per_fail_mode(tmp_path: Path) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, family=socket.AF_INET)
    port = server.sockets[0].getsockname()[1]
    body = SpooledBody(tmp_path, "Q1")
    body.write(message("hello"))
    body.finish()
    scanner = RspamdScanner()
    try:
        for fail, action in (("open", "accept"), ("closed", "tempfail")):
            document = base_config(tmp_path, 25)
            document = merge(
                document, {"spam": {"rspamd": {"url": f"http://127.0.0.1:{port}", "fail": fail}}}
            )
            result = await scanner.scan(facts(), body, parse_config(document))
            assert result.action == action, result
            assert scanner.down
    finally:
        await scanner.aclose()
        server.close()
        await server.wait_closed()


def test_policy_explain_names_the_scanner_and_its_fail_mode(tmp_path: Path) -> None:
    document = merge(
        base_config(tmp_path, 25),
        {
            "connection_profiles": [PARTNER],
            "spam": {"rspamd": {"url": "http://127.0.0.1:11333", "fail": "closed"}},
        },
    )
    config = parse_config(document)
    outside = explain(config, ProfileIndex(config), {}, Facts("192.0.2.9", sender="a@x.test"))
    text = outside.as_text()
    assert "spam check:   yes" in text
    assert "scanner:    rspamd at http://127.0.0.1:11333 (fail closed: 451 when it is down)" in text
    partner = explain(config, ProfileIndex(config), {}, Facts("127.0.0.2", sender="a@x.test"))
    assert "spam check:   no" in partner.as_text()
    assert "scanner:" not in partner.as_text()
    bare = parse_config(base_config(tmp_path, 25))
    unscanned = explain(bare, ProfileIndex(bare), {}, Facts("192.0.2.9", sender="a@x.test"))
    assert "none configured (spam.rspamd)" in unscanned.as_text()


async def test_larger_than_max_size_is_not_scanned_and_says_so(tmp_path: Path) -> None:
    body = SpooledBody(tmp_path, "Q1")
    body.write(message("x" * 2000))
    body.finish()
    document = merge(base_config(tmp_path, 25), {"spam": {"rspamd": {"max_size": 1024}}})
    scanner = RspamdScanner()  # nothing listens at its url: it is never asked
    result = await scanner.scan(facts(), body, parse_config(document))
    assert result.action == "accept"
    assert result.headers == (("X-Spam-Status", "unchecked (larger than 1024 octets)"),)
    assert not scanner.down


def test_config_check_wants_the_password_file_private(tmp_path: Path) -> None:
    secret = tmp_path / "rspamd.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    document = merge(base_config(tmp_path, 25), {"spam": {"rspamd": {"password_file": secret}}})
    with pytest.raises(ConfigError, match=r"spam\.rspamd\.password_file: .*chmod 600"):
        parse_config(document)
    secret.chmod(0o600)
    assert parse_config(document).spam.rspamd is not None
    with pytest.raises(ConfigError, match="http://HOST:PORT"):
        parse_config(merge(document, {"spam": {"rspamd": {"url": "127.0.0.1:11333"}}}))
