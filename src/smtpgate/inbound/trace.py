"""The Received: trace header added to every message we accept.

RFC 5321 §4.4 requires it; RFC 3848 names the protocol (SMTP, ESMTP,
ESMTPS, ESMTPA, ESMTPSA). The TLS version and cipher are recorded in a
comment, the way Postfix does, so a reader can see how the hop was secured.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class TraceFacts:
    helo: str
    client_ip: str
    client_name: str | None
    by_host: str
    esmtp: bool
    tls: str | None  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    authenticated: bool
    queue_id: str
    recipient: str | None  # named only when the message has exactly one


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 §1 'with' keyword."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def _clean(text: str) -> str:
    """Keep header text to printable ASCII on one line."""
    if text.isascii() and text.isprintable():  # nearly always: no copy char by char
        return text[:255]
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:255]


@lru_cache(maxsize=4)
def _date(seconds: int) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, UTC))


def received_header(facts: TraceFacts, when: datetime) -> bytes:
    """A folded ``Received:`` header, CRLF-terminated."""
    name = _clean(facts.client_name or "unknown")
    ip = facts.client_ip
    literal = f"IPv6:{ip}" if ":" in ip else ip
    lines = [f"Received: from {_clean(facts.helo)} ({name} [{literal}])"]
    if facts.tls:
        lines.append(f"\t(using {_clean(facts.tls)})")
    proto = protocol_name(facts.esmtp, facts.tls is not None, facts.authenticated)
    lines.append(f"\tby {facts.by_host} (smtpgate) with {proto} id {facts.queue_id}")
    if facts.recipient:
        lines.append(f"\tfor <{_clean(facts.recipient)}>")
    lines[-1] += ";"
    lines.append(f"\t{_date(int(when.timestamp()))}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
