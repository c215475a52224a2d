"""Delivery status notifications (RFC 3464): bounces, delay warnings, relays.

Rules kept here:

* A report is ``multipart/report; report-type=delivery-status`` (RFC 6522)
  with a human-readable part, a ``message/delivery-status`` part and the
  original: in full (``message/rfc822``) unless RET=HDRS or it is larger
  than ``RETURN_LIMIT`` octets, then its header (``text/rfc822-headers``).
* NOTIFY (RFC 3461 §4.1) decides who gets one: NEVER → nobody; otherwise
  failures by default, delays unless NOTIFY lists only other conditions,
  successes ("relayed") only when asked for.
* ENVID and ORCPT are returned as Original-Envelope-Id and
  Original-Recipient (RFC 3464 §2.2.1, §2.3.1).
* A message with the null sender never gets a report (RFC 5321 §4.5.5);
  reports are sent from the null sender, so they cannot loop.
* Lines end in CRLF and nothing else: the report passes the same checks as
  any other message.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Literal

from smtpgate.model.envelope import Notify

Action = Literal["failed", "delayed", "relayed"]
RETURN_LIMIT = 50_000  # Postfix bounce_size_limit


def wants_report(notify: frozenset[Notify] | None, action: Action) -> bool:
    if notify is not None and not notify:
        return False  # NOTIFY=NEVER
    if action == "failed":
        return notify is None or "FAILURE" in notify
    if action == "delayed":
        return notify is None or "DELAY" in notify
    return notify is not None and "SUCCESS" in notify


@dataclass(frozen=True)
class ReportedRecipient:
    address: str
    orcpt: tuple[str, str] | None
    action: Action
    status: str  # enhanced status code, e.g. 5.1.1
    diagnostic: str | None  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_mta: str | None
    last_attempt: float


@dataclass(frozen=True)
class Report:
    reporting_mta: str
    queue_id: str
    to: str  # the original sender (or the administrator for a failed report)
    arrival: float
    envid: str | None
    ret: Literal["FULL", "HDRS"] | None
    recipients: tuple[ReportedRecipient, ...]
    will_retry_until: float | None = None


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _clean(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Delivery Report",
}


def _human(report: Report, action: Action) -> list[str]:
    intro = {
        "failed": "Your message could not be delivered to the recipients below.",
        "delayed": "Your message has not been delivered yet; delivery will be retried"
        + (f" until {_date(report.will_retry_until)}." if report.will_retry_until else "."),
        "relayed": "Your message was passed on to the next server, which does not "
        "send delivery reports itself.",
    }[action]
    lines = [f"This is the mail system at {report.reporting_mta}.", "", intro, ""]
    for r in report.recipients:
        lines.append(f"<{_clean(r.address)}>: {_clean(r.diagnostic or r.status)}")
    return lines


def _status_fields(report: Report) -> list[str]:
    fields = [f"Reporting-MTA: dns; {report.reporting_mta}"]
    if report.envid:
        fields.append(f"Original-Envelope-Id: {_clean(report.envid)}")
    fields += [f"X-Queue-ID: {report.queue_id}", f"Arrival-Date: {_date(report.arrival)}"]
    for r in report.recipients:
        fields.append("")
        if r.orcpt:
            fields.append(f"Original-Recipient: {_clean(r.orcpt[0])}; {_clean(r.orcpt[1])}")
        fields += [
            f"Final-Recipient: rfc822; {_clean(r.address)}",
            f"Action: {r.action}",
            f"Status: {r.status}",
        ]
        if r.remote_mta:
            fields.append(f"Remote-MTA: dns; {_clean(r.remote_mta)}")
        if r.diagnostic:
            fields.append(f"Diagnostic-Code: smtp; {_clean(r.diagnostic)}")
        fields.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.action == "delayed" and report.will_retry_until:
            fields.append(f"Will-Retry-Until: {_date(report.will_retry_until)}")
    return fields


def _returned(report: Report, original: bytes, original_size: int) -> tuple[str, bytes]:
    end = original.find(b"\r\n\r\n")
    headers = original[: end + 2] if end >= 0 else original
    if report.ret == "HDRS" or original_size > RETURN_LIMIT:
        return "text/rfc822-headers", headers
    return "message/rfc822", original


def build_report(report: Report, original: bytes, original_size: int, now: float) -> bytes:
    """The report as wire bytes (CRLF line ends). ``original`` may be truncated
    to its first ``RETURN_LIMIT`` octets; ``original_size`` is its real size."""
    action = report.recipients[0].action
    boundary = f"{report.queue_id}.{secrets.token_hex(8)}/{report.reporting_mta}"
    kind, returned = _returned(report, original, original_size)
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{report.reporting_mta}>",
        f"To: <{_clean(report.to)}>",
        f"Subject: {_SUBJECTS[action]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{report.queue_id}.{secrets.token_hex(6)}@{report.reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *_human(report, action),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *_status_fields(report),
        "",
        f"--{boundary}",
        f"Content-Type: {kind}",
        "Content-Transfer-Encoding: 8bit",
        "",
    ]
    text = "\r\n".join(head).encode("ascii") + b"\r\n"
    if returned and not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    return text + returned + f"\r\n--{boundary}--\r\n".encode("ascii")
