"""Certificate expiry notices: a log warning, and a mail to ``gateway.admin_address``
30, 14 and 3 days before a configured certificate expires.

The running gateway checks at start and then daily. Each threshold is mailed
once per certificate: what was sent is kept in ``data_dir/cert-expiry.json``
(0600), keyed by the certificate's name and SHA-256 fingerprint, so a renewed
certificate starts afresh and a restart does not repeat a notice. A gateway
that first sees a certificate already past several thresholds sends one
notice, the nearest, and counts the others as sent. The log warning comes at
every check while a certificate is within 30 days (or expired).

The notice enters the queue like the gateway's delivery reports, with the null
sender (nothing bounces back to it) as an administrator report: if it cannot
be delivered, it is dropped, not reported again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from smtpgate.config.schema import GatewayConfig
from smtpgate.files import write_private
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.observe.log import get_logger
from smtpgate.spool import SpooledBody, new_queue_id
from smtpgate.tls.certificates import Loaded

log = get_logger("smtpgate.tls")

THRESHOLDS = (30, 14, 3)  # days before expiry; each mailed once
DAY = 86400.0
STATE_FILE = "cert-expiry.json"
MAX_REMEMBERED = 1000  # certificates remembered; old entries go first


def due(not_after: dt.datetime, now: dt.datetime, sent: set[int]) -> tuple[int | None, set[int]]:
    """The threshold to notify now (None: nothing) and every threshold crossed.
    ``sent``: the thresholds already notified for this certificate."""
    left = not_after - now
    crossed = {days for days in THRESHOLDS if left <= dt.timedelta(days=days)}
    if not crossed:
        return None, crossed
    nearest = min(crossed)
    return (None if nearest in sent else nearest), crossed


def identity(name: str, leaf: x509.Certificate) -> str:
    """The key a certificate's notices are remembered under."""
    return f"{name} {leaf.fingerprint(hashes.SHA256()).hex()}"


def configured_leaves(
    config: GatewayConfig, loaded: dict[str, Loaded]
) -> list[tuple[str, x509.Certificate]]:
    """Each configured certificate's leaf, read again from its PEM file when it
    has one (a renewed file counts at once), else as loaded (PKCS#12)."""
    found = []
    for cert in config.certificates:
        leaf = None
        if cert.cert is not None:
            with contextlib.suppress(OSError, ValueError):
                leaf = x509.load_pem_x509_certificates(cert.cert.read_bytes())[0]
        if leaf is None and cert.name in loaded:
            leaf = loaded[cert.name].chain[0]
        if leaf is not None:
            found.append((cert.name, leaf))
    return found


@dataclass(frozen=True)
class Notice:
    """One mail to send: ``days`` is the threshold, ``left`` the time remaining."""

    name: str
    subject: str
    not_after: dt.datetime
    days: int
    left: dt.timedelta


def notice_message(
    notice: Notice, config: GatewayConfig, spool_dir: Path, now: dt.datetime
) -> tuple[Envelope, SpooledBody]:
    """The notice for ``gateway.admin_address`` (set) as a queued message's
    envelope and body."""
    hostname, node, admin = (
        config.gateway.hostname,
        config.gateway.node,
        config.gateway.admin_address,
    )
    assert admin is not None
    message = EmailMessage()
    message["From"] = f"postmaster@{hostname}"
    message["To"] = admin
    expires = f"{notice.not_after:%Y-%m-%d %H:%M} UTC"
    if notice.left.total_seconds() <= 0:
        message["Subject"] = f"Certificate {notice.name} on {hostname} has expired ({expires})"
    else:
        message["Subject"] = (
            f"Certificate {notice.name} on {hostname} expires in {notice.left.days} days"
            f" ({expires})"
        )
    message["Date"] = format_datetime(now)
    message["Message-ID"] = make_msgid(domain=hostname)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no automatic replies
    message.set_content(
        f"The certificate {notice.name} configured on {hostname} (node {node})\n"
        f"  subject:   {notice.subject}\n"
        f"  not after: {expires}\n"
        f"expires within {notice.days} days. Renew it, put the new files in place\n"
        "and run `smtpgate reload` (or systemctl reload smtpgate).\n\n"
        f"This notice is sent {', '.join(str(d) for d in THRESHOLDS)} days before expiry.\n"
    )
    body = SpooledBody(spool_dir, new_queue_id())
    body.write(message.as_bytes(policy=message.policy.clone(linesep="\r\n")))
    body.finish()
    return Envelope(sender="", recipients=(Recipient(admin),)), body


# queues the notice (now: the check's time); False when there is nobody to send it to
Notify = Callable[[Notice, dt.datetime], Awaitable[bool]]


@dataclass
class ExpiryNotices:
    """The running gateway's check: ``check`` once, or ``run`` (at start, then
    every ``interval`` seconds, or at once when ``wake`` is set)."""

    state_path: Path
    leaves: Callable[[], list[tuple[str, x509.Certificate]]]
    notify: Notify
    clock: Callable[[], float] = time.time
    interval: float = DAY
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def _load(self) -> dict[str, list[int]]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(state, dict):
            return {}
        return {
            str(k): [int(d) for d in v if isinstance(d, int)]
            for k, v in state.items()
            if isinstance(v, list)
        }

    async def check(self) -> list[Notice]:
        """Warn about each certificate within 30 days; notify each threshold
        newly reached; returns the notices sent."""
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        state = self._load()
        sent: list[Notice] = []
        changed = False
        for name, leaf in self.leaves():
            key = identity(name, leaf)
            ends = leaf.not_valid_after_utc
            threshold, crossed = due(ends, now, set(state.get(key, [])))
            if not crossed:
                continue
            log.warning(
                "certificate expires soon" if ends > now else "certificate expired",
                certificate=name,
                not_after=ends.isoformat(),
                days_left=(ends - now).days,
            )
            if threshold is None:
                continue
            notice = Notice(name, leaf.subject.rfc4514_string(), ends, threshold, ends - now)
            if not await self.notify(notice, now):
                continue  # no gateway.admin_address yet: the log warning only
            sent.append(notice)
            before = set(state.pop(key, []))  # re-inserted last: the newest are kept
            state[key] = sorted(crossed | before, reverse=True)
            changed = True
        if changed:
            kept = dict(list(state.items())[-MAX_REMEMBERED:])
            write_private(self.state_path, json.dumps(kept).encode())
        return sent

    async def run(self) -> None:
        while True:
            self.wake.clear()  # a wake during the check: check again
            try:
                await self.check()
            except Exception as exc:  # a full disk, a broken file: try again tomorrow
                log.error("certificate expiry check failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval)
