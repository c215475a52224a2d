"""Table tests for delivery status notifications (RFC 3464): who gets one, the
report's headers, its per-message and per-recipient fields, and what of the
original it returns."""

from __future__ import annotations

import email
import re
from dataclasses import replace
from email.message import Message
from typing import Literal

import pytest

from smtpgate.model.envelope import Notify
from smtpgate.queue.dsn import (
    RETURN_LIMIT,
    Action,
    Report,
    ReportedRecipient,
    build_report,
    wants_report,
)

ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
ORIGINAL = b"Subject: t\r\nMessage-ID: <m1@x>\r\n\r\nthe body\r\n"
HEADERS = b"Subject: t\r\nMessage-ID: <m1@x>\r\n"
ALICE = ReportedRecipient(
    "alice@example.com",
    ("rfc822", "orig@x.example"),
    "failed",
    "5.1.1",
    "550 5.1.1 no such user",
    "mx.example.com",
    ARRIVAL + 60,
)
CAROL = ReportedRecipient("carol@example.com", None, "failed", "4.4.7", None, None, ARRIVAL + 90)
REPORT = Report("gw.test", "Q1", "bob@example.org", ARRIVAL, None, None, (ALICE,))


def _build(report: Report, original: bytes = ORIGINAL, size: int | None = None) -> Message:
    wire = build_report(report, original, len(original) if size is None else size, ARRIVAL + 120)
    assert b"\n" not in wire.replace(b"\r\n", b""), "a bare LF"
    assert b"\r" not in wire.replace(b"\r\n", b""), "a bare CR"
    return email.message_from_bytes(wire)


def _parts(message: Message) -> list[Message]:
    """A multipart's parts (or a message/delivery-status part's field groups)."""
    payload = message.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, Message)]


def _text(part: Message) -> str:
    payload = part.get_payload()
    assert isinstance(payload, str)
    return payload


def _groups(message: Message) -> list[dict[str, str]]:
    """The delivery-status part's field groups: per message, then per recipient."""
    status = _parts(message)[1]
    assert status.get_content_type() == "message/delivery-status"
    return [dict(group.items()) for group in _parts(status)]


def _all(report: Report, action: Action) -> Report:
    return replace(report, recipients=tuple(replace(r, action=action) for r in report.recipients))


# NOTIFY → (failed, delayed, relayed) reported
@pytest.mark.parametrize(
    ("notify", "wanted"),
    [
        (None, (True, True, False)),
        (frozenset(), (False, False, False)),  # NOTIFY=NEVER
        (frozenset({"FAILURE"}), (True, False, False)),
        (frozenset({"DELAY"}), (False, True, False)),
        (frozenset({"SUCCESS"}), (False, False, True)),
        (frozenset({"SUCCESS", "FAILURE", "DELAY"}), (True, True, True)),
    ],
)
def test_notify_decides_who_gets_a_report(
    notify: frozenset[Notify] | None, wanted: tuple[bool, bool, bool]
) -> None:
    actions: tuple[Action, ...] = ("failed", "delayed", "relayed")
    assert tuple(wants_report(notify, a) for a in actions) == wanted


@pytest.mark.parametrize(
    ("action", "subject", "intro"),
    [
        ("failed", "Undelivered Mail Returned to Sender", "could not be delivered"),
        ("delayed", "Delayed Mail (still being retried)", "has not been delivered yet"),
        ("relayed", "Successful Mail Delivery Report", "does not send delivery reports"),
    ],
)
def test_report_headers_and_parts(action: Action, subject: str, intro: str) -> None:
    message = _build(_all(REPORT, action))
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@gw.test>"
    assert message["To"] == "<bob@example.org>"
    assert message["Subject"] == subject
    assert message["Date"] == "Tue, 14 Nov 2023 22:15:20 +0000"
    assert re.fullmatch(r"<Q1\.[0-9a-f]{12}@gw\.test>", message["Message-ID"])
    assert message["Auto-Submitted"] == "auto-replied"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, _, returned = _parts(message)
    assert human.get_content_type() == "text/plain"
    text = _text(human)
    assert "This is the mail system at gw.test." in text
    assert intro in text
    assert "<alice@example.com>: 550 5.1.1 no such user" in text
    assert returned.get_content_type() == "message/rfc822"


@pytest.mark.parametrize("action", ["failed", "delayed", "relayed"])
def test_per_message_and_per_recipient_fields(action: Action) -> None:
    report = replace(_all(REPORT, action), will_retry_until=ARRIVAL + 3600)
    per_message, alice = _groups(_build(report))
    assert per_message == {
        "Reporting-MTA": "dns; gw.test",
        "X-Queue-ID": "Q1",
        "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
    }
    expected = {
        "Original-Recipient": "rfc822; orig@x.example",
        "Final-Recipient": "rfc822; alice@example.com",
        "Action": action,
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:14:20 +0000",
    }
    if action == "delayed":  # only a delay says until when it retries
        expected["Will-Retry-Until"] = "Tue, 14 Nov 2023 23:13:20 +0000"
    assert alice == expected
    assert list(alice) == list(expected)  # Original-Recipient first, as RFC 3464 orders


def test_the_delay_text_names_the_retry_deadline() -> None:
    report = replace(_all(REPORT, "delayed"), will_retry_until=ARRIVAL + 3600)
    text = _text(_parts(_build(report))[0])
    assert "retried until Tue, 14 Nov 2023 23:13:20 +0000." in text


def test_envid_is_returned_as_original_envelope_id() -> None:
    per_message, _ = _groups(_build(replace(REPORT, envid="env-42")))
    assert per_message["Original-Envelope-Id"] == "env-42"
    assert list(per_message)[:2] == ["Reporting-MTA", "Original-Envelope-Id"]


def test_a_recipient_without_orcpt_reply_or_remote_has_only_the_fields_it_can() -> None:
    _, alice, carol = _groups(_build(replace(REPORT, recipients=(ALICE, CAROL))))
    assert alice["Final-Recipient"] == "rfc822; alice@example.com"
    assert carol == {
        "Final-Recipient": "rfc822; carol@example.com",
        "Action": "failed",
        "Status": "4.4.7",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:14:50 +0000",
    }


# (RET, size of the original) → (returned part's type, returned content)
@pytest.mark.parametrize(
    ("ret", "size", "kind", "content"),
    [
        (None, None, "message/rfc822", ORIGINAL),
        ("FULL", None, "message/rfc822", ORIGINAL),
        ("HDRS", None, "text/rfc822-headers", HEADERS),
        ("FULL", RETURN_LIMIT + 1, "text/rfc822-headers", HEADERS),  # too big to return
        (None, RETURN_LIMIT, "message/rfc822", ORIGINAL),
    ],
)
def test_ret_decides_what_of_the_original_comes_back(
    ret: Literal["FULL", "HDRS"] | None, size: int | None, kind: str, content: bytes
) -> None:
    report = replace(REPORT, ret=ret)
    returned = _parts(_build(report, size=size))[2]
    assert returned.get_content_type() == kind
    assert returned["Content-Transfer-Encoding"] == "8bit"
    wire = build_report(report, ORIGINAL, len(ORIGINAL) if size is None else size, ARRIVAL)
    part = wire.split(f"Content-Type: {kind}\r\n".encode())[1]
    assert part.split(b"\r\n\r\n", 1)[1].startswith(content + b"\r\n--")


def test_control_characters_cannot_inject_fields_or_headers() -> None:
    evil = replace(
        ALICE,
        address="a\r\nBcc: x@evil@example.com",
        diagnostic="550 no\r\nAction: delivered",
        orcpt=("rfc822", "o\nX: y"),
    )
    report = replace(REPORT, to="bob\r\nBcc: x@evil", envid="e\r\nX: 1", recipients=(evil,))
    message = _build(report)
    assert message["Bcc"] is None
    assert message["To"] == "<bob??Bcc: x@evil>"
    per_message, rcpt = _groups(message)
    assert per_message["Original-Envelope-Id"] == "e??X: 1"
    assert rcpt["Action"] == "failed"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 no??Action: delivered"
    assert rcpt["Original-Recipient"] == "rfc822; o?X: y"
    assert rcpt["Final-Recipient"] == "rfc822; a??Bcc: x@evil@example.com"


def test_a_report_returns_a_truncated_original_with_a_line_end() -> None:
    cut = ORIGINAL[:-3]  # the queue passes at most RETURN_LIMIT octets
    wire = build_report(REPORT, cut, len(ORIGINAL), ARRIVAL)
    assert cut + b"\r\n\r\n--" in wire
