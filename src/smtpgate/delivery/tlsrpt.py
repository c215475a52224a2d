"""SMTP TLS reporting (RFC 8460): what we record, what we send, what we read.

* ``SessionRecorder``: every outbound TLS session of a direct delivery is
  counted per UTC day, policy domain, policy (type and strings), result
  (``success`` or a failure type of §4.3) and receiving MX, in
  ``data_dir/tlsrpt.db`` (SQLite, 0600, node-local). Counting, not logging
  each session: the table grows with distinct outcomes, not with traffic;
  days older than ``KEEP_DAYS`` are deleted.
* ``build_report``: the aggregate report of one day for one policy domain,
  the JSON of §4.4; ``report_mail`` wraps it gzip'ed in the multipart/report
  message of §5.3 (``report-type=tlsrpt``, ``application/tlsrpt+gzip``).
* ``send_reports``: for each domain with sessions that day and a
  ``_smtp._tls`` record (``v=TLSRPTv1; rua=...``), the report to each
  ``rua``: ``mailto:`` through the queue (the ``submit`` callback the
  composition root gives), ``https:`` as a POST (verified TLS, no
  redirects, time-limited). A domain's report for a day is sent once.
* ``summarize``: a TLS report someone sent us (JSON, gzip'ed JSON, or the
  whole message) as readable lines.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import email.utils
import gzip
import io
import json
import secrets
import sqlite3
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx

from smtpgate.databases import wal
from smtpgate.dns import Resolver
from smtpgate.files import private_file
from smtpgate.observe.log import get_logger
from smtpgate.policy.tls import OutboundPolicy
from smtpgate.policy.transport import DomainFacts

log = get_logger("smtpgate.tlsrpt")

KEEP_DAYS = 14
MAX_DETAIL = 200
MAX_REPORT = 8 * 1024 * 1024  # a report we read (decompressed)
POST_TIMEOUT = 30.0
RESULT_TYPES = frozenset(
    {
        "starttls-not-supported",
        "certificate-host-mismatch",
        "certificate-expired",
        "certificate-not-trusted",
        "validation-failure",
        "tlsa-invalid",
        "dnssec-invalid",
        "dane-required",
        "sts-policy-fetch-error",
        "sts-policy-invalid",
        "sts-webpki-invalid",
    }
)
POLICY_TYPES = frozenset({"tlsa", "sts", "no-policy-found"})

Submit = Callable[[str, bytes], Awaitable[str]]  # (recipient, message) → queue id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    day TEXT NOT NULL, domain TEXT NOT NULL, policy_type TEXT NOT NULL,
    policy_strings TEXT NOT NULL, mx_patterns TEXT NOT NULL, result TEXT NOT NULL,
    receiving_mx TEXT NOT NULL, receiving_ip TEXT NOT NULL, detail TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, policy_type, policy_strings, result, receiving_mx, receiving_ip)
);
CREATE TABLE IF NOT EXISTS sent (day TEXT NOT NULL, domain TEXT NOT NULL,
    PRIMARY KEY (day, domain));
"""


def utc_day(when: float | None = None) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() if when is None else when, datetime.UTC)
    return moment.date().isoformat()


def _policy_of(facts: DomainFacts, policy: OutboundPolicy) -> tuple[str, list[str], list[str]]:
    """(policy type, policy strings, mx patterns) for the report."""
    if policy.published == "tlsa":
        return "tlsa", [r.text() for r in policy.tlsa], []
    if policy.published == "sts" and facts.sts is not None:
        return "sts", list(facts.sts.text), list(facts.sts.mx)
    return "no-policy-found", [], []


class SessionRecorder:
    """Counts of TLS session outcomes by day (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            private_file(self.path)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=5
            )
            # counters on the event loop: no fsync per session (a crash may lose the last few)
            wal(self._db, synchronous="normal", schema=_SCHEMA)  # each worker opens it
        return self._db

    def record(  # noqa: PLR0913, PLR0917 - one session's facts
        self,
        facts: DomainFacts,
        policy: OutboundPolicy,
        host: str,
        address: str,
        failure: str | None,
        detail: str = "",
        when: float | None = None,
    ) -> None:
        kind, strings, patterns = _policy_of(facts, policy)
        if failure is None and facts.sts_error is not None and kind == "no-policy-found":
            failure = facts.sts_error  # a published policy we could not use is a failure
        result = failure if failure in RESULT_TYPES else "success" if failure is None else ""
        if not result:
            result = "validation-failure"
        row = (
            utc_day(when), facts.domain, kind, json.dumps(strings), json.dumps(patterns),
            result, host if result != "success" else "", address if result != "success" else "",
            detail[:MAX_DETAIL] if result != "success" else "",
        )  # fmt: skip
        try:
            with self._lock:
                self._open().execute(
                    "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,1) ON CONFLICT DO UPDATE"
                    " SET count = count + 1, detail = excluded.detail",
                    row,
                )
        except sqlite3.Error as exc:
            log.warning("TLS session not recorded", domain=facts.domain, error=str(exc))

    def rows(self, day: str, domain: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            db = self._open()
            db.row_factory = sqlite3.Row
            found = db.execute(
                "SELECT * FROM sessions WHERE day = ? AND (? IS NULL OR domain = ?)",
                (day, domain, domain),
            ).fetchall()
            db.row_factory = None
        return [dict(r) for r in found]

    def domains(self, day: str) -> list[str]:
        with self._lock:
            found = self._open().execute(
                "SELECT DISTINCT domain FROM sessions WHERE day = ? AND domain NOT IN"
                " (SELECT domain FROM sent WHERE day = ?) ORDER BY domain",
                (day, day),
            )
            return [r[0] for r in found.fetchall()]

    def mark_sent(self, day: str, domain: str) -> None:
        with self._lock:
            self._open().execute("INSERT OR IGNORE INTO sent VALUES (?, ?)", (day, domain))

    def forget_before(self, day: str) -> None:
        with self._lock:
            db = self._open()
            db.execute("DELETE FROM sessions WHERE day < ?", (day,))
            db.execute("DELETE FROM sent WHERE day < ?", (day,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# -- the report -------------------------------------------------------------------------


def build_report(  # noqa: PLR0913 - the report's header fields
    rows: Iterable[dict[str, Any]],
    day: str,
    domain: str,
    *,
    organization: str,
    contact: str,
    report_id: str,
) -> dict[str, Any]:
    """The aggregate report (RFC 8460 §4.4) of ``rows`` (one day, one domain)."""
    policies: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["policy_type"], row["policy_strings"], row["mx_patterns"])
        entry = policies.get(key)
        if entry is None:
            policy: dict[str, Any] = {"policy-type": row["policy_type"], "policy-domain": domain}
            if row["policy_type"] != "no-policy-found":
                policy["policy-string"] = json.loads(row["policy_strings"])
            if json.loads(row["mx_patterns"]):
                policy["mx-host"] = json.loads(row["mx_patterns"])
            entry = {
                "policy": policy,
                "summary": {"total-successful-session-count": 0, "total-failure-session-count": 0},
                "failure-details": [],
            }
            policies[key] = entry
        if row["result"] == "success":
            entry["summary"]["total-successful-session-count"] += row["count"]
            continue
        entry["summary"]["total-failure-session-count"] += row["count"]
        detail: dict[str, Any] = {
            "result-type": row["result"],
            "receiving-mx-hostname": row["receiving_mx"],
            "failed-session-count": row["count"],
        }
        if row["receiving_ip"]:
            detail["receiving-ip"] = row["receiving_ip"]
        if row["detail"]:
            detail["failure-reason-code"] = row["detail"]
        entry["failure-details"].append(detail)
    for entry in policies.values():
        if not entry["failure-details"]:
            del entry["failure-details"]
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": report_id,
        "policies": list(policies.values()),
    }


def _stamp(day: str, end: bool = False) -> int:
    start = datetime.datetime.fromisoformat(f"{day}T00:00:00+00:00")
    return int(start.timestamp()) + (86399 if end else 0)


def report_mail(  # noqa: PLR0913 - the message's parties and the report
    report: dict[str, Any],
    domain: str,
    day: str,
    *,
    submitter: str,
    sender: str,
    recipient: str,
) -> bytes:
    """The report as the message of RFC 8460 §5.3."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = (
        f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    )
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = email.utils.make_msgid(domain=submitter)
    message.set_content(
        f"This is an aggregate TLS report from {submitter} for {domain}, {day} (RFC 8460).\n"
    )
    name = f"{submitter}!{domain}!{_stamp(day)}!{_stamp(day, True)}!{report['report-id']}.json.gz"
    message.add_attachment(
        gzip.compress(json.dumps(report).encode()),
        maintype="application",
        subtype="tlsrpt+gzip",
        filename=name,
    )
    message.replace_header("Content-Type", "multipart/report; report-type=tlsrpt")
    message.set_boundary(f"tlsrpt-{secrets.token_hex(8)}")
    return message.as_bytes()


def parse_rua(texts: list[str]) -> list[str]:
    """The ``rua`` URIs of the one ``v=TLSRPTv1`` record (RFC 8460 §3), or none."""
    found = [t for t in texts if t.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(found) != 1:
        return []
    for part in found[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip() == "rua":
            uris = [u.strip() for u in value.split(",")]
            return [u for u in uris if u.startswith(("mailto:", "https://"))][:10]
    return []


async def _post(uri: str, payload: bytes, ca_files: tuple[str, ...]) -> None:
    context = ssl.create_default_context()
    for path in ca_files:
        context.load_verify_locations(cafile=path)
    async with httpx.AsyncClient(
        verify=context, follow_redirects=False, timeout=POST_TIMEOUT
    ) as client:
        response = await client.post(
            uri, content=payload, headers={"Content-Type": "application/tlsrpt+gzip"}
        )
    if not 200 <= response.status_code < 300:
        raise httpx.HTTPError(f"HTTP {response.status_code}")


async def send_reports(  # noqa: PLR0913 - where from, where to, and how
    recorder: SessionRecorder,
    resolver: Resolver,
    day: str,
    *,
    organization: str,
    contact: str,
    submitter: str,
    sender: str,
    submit: Submit | None,
    ca_files: tuple[str, ...] = (),
) -> list[str]:
    """Send ``day``'s reports; returns what was done, one line per ``rua``."""
    done: list[str] = []
    for domain in recorder.domains(day):
        record = await resolver.records(f"_smtp._tls.{domain}", "TXT")
        if record.status == "temporary":
            continue  # try again next round
        rua = parse_rua(record.values) if record.status == "ok" else []
        report = build_report(
            recorder.rows(day, domain),
            day,
            domain,
            organization=organization or submitter,
            contact=contact or sender,
            report_id=f"{day}.{domain}.{secrets.token_hex(6)}@{submitter}",
        )
        for uri in rua:
            try:
                if uri.startswith("mailto:") and submit is not None:
                    to = uri.removeprefix("mailto:").split("?")[0]
                    mail = report_mail(
                        report, domain, day, submitter=submitter, sender=sender, recipient=to
                    )
                    queue_id = await submit(to, mail)
                    done.append(f"{domain}: queued {queue_id} to {to}")
                elif uri.startswith("https://"):
                    await _post(uri, gzip.compress(json.dumps(report).encode()), ca_files)
                    done.append(f"{domain}: posted to {uri}")
            except (httpx.HTTPError, OSError, ValueError) as exc:
                done.append(f"{domain}: {uri} failed: {exc}")
        log.info("TLS report", domain=domain, day=day, rua=len(rua))
        recorder.mark_sent(day, domain)
    return done


# -- reading reports addressed to us -----------------------------------------------


def load_report(data: bytes) -> dict[str, Any]:
    """A TLS report from JSON, gzip'ed JSON or a whole report message."""
    if data[:2] == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as unzipped:
            data = unzipped.read(MAX_REPORT + 1)
        if len(data) > MAX_REPORT:
            raise ValueError("the report is too large")
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        loaded = json.loads(stripped)
        if not isinstance(loaded, dict):
            raise ValueError("not a TLS report")
        return loaded
    message = email.message_from_bytes(data, policy=email.policy.default)
    for part in message.walk():
        if part.get_content_type() in ("application/tlsrpt+gzip", "application/tlsrpt+json"):
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return load_report(payload)
    raise ValueError("no TLS report (application/tlsrpt+gzip or +json) in the message")


def summarize(report: dict[str, Any]) -> list[str]:
    """Readable lines: who reported which days, and each policy's outcome."""
    dates = report.get("date-range", {})
    lines = [
        f"from:     {report.get('organization-name', '?')} ({report.get('contact-info', '?')})",
        f"period:   {dates.get('start-datetime', '?')} to {dates.get('end-datetime', '?')}",
        f"report:   {report.get('report-id', '?')}",
    ]
    for entry in report.get("policies", []):
        policy, summary = entry.get("policy", {}), entry.get("summary", {})
        lines.append(
            f"policy:   {policy.get('policy-domain', '?')} {policy.get('policy-type', '?')}:"
            f" {summary.get('total-successful-session-count', 0)} successful,"
            f" {summary.get('total-failure-session-count', 0)} failed"
        )
        for failure in entry.get("failure-details", []):
            where = failure.get("receiving-mx-hostname") or failure.get("receiving-ip") or "?"
            why = failure.get("failure-reason-code") or failure.get("additional-information")
            lines.append(
                f"  {failure.get('failed-session-count', 0)} x {failure.get('result-type', '?')}"
                f" at {where}" + (f" ({why})" if why else "")
            )
    return lines
