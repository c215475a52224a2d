"""The mail log: Postfix-grade lines a mail administrator can grep.

One line per accepted message, one per recipient per delivery attempt, one
per refusal, one per report sent; the formats are documented in
``docs/operations.md`` ("Logs") and tested against that text. In plain text
(the default) a line is exactly the format; with ``--log-json`` it is the
JSON object ``{"event": "mail", "line": <the same text>, ...facts}``, so a
log pipeline can match either. Lines go where the rest of the log goes
(``observe.log``: stderr, syslog or journald).
"""

from __future__ import annotations

import re

from smtpgate.observe import log as logs
from smtpgate.observe.events import (
    Client,
    DeliveryAttempt,
    DsnSent,
    Event,
    MessageAccepted,
    Quarantined,
    Refused,
)

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")  # no client can forge a second log line
MAX_FIELD = 1000
DSN_KINDS = {"failed": "non-delivery", "delayed": "delay", "delivered": "delivery"}


def clean(text: str) -> str:
    return _UNSAFE.sub("?", text)[:MAX_FIELD]


def tls_short(tls: str | None) -> str:
    """``TLSv1.3/TLS_AES_256_GCM_SHA384`` from a TLS summary; ``none`` without."""
    if not tls:
        return "none"
    return "/".join(tls.split()[:2])


def client_text(client: Client) -> str:
    return f"{clean(client.name or 'unknown')}[{client.ip}]"


def seconds(value: float) -> str:
    """Postfix's style: ``12``, ``1.2``, ``0.01``, ``0`` (hundredths below 10)."""
    if value >= 10:
        return str(round(value))
    text = f"{max(value, 0.0):.2f}".rstrip("0").rstrip(".")
    return text or "0"


def line(event: Event) -> str | None:
    """The mail log line of ``event`` (None: the event has none)."""
    if isinstance(event, MessageAccepted):
        return accepted_line(event)
    if isinstance(event, DeliveryAttempt):
        return delivery_line(event)
    if isinstance(event, Refused):
        return refused_line(event) if event.first else None
    if isinstance(event, DsnSent):
        kind = DSN_KINDS.get(event.action, event.action)
        return f"{event.about}: sender {kind} notification: {event.queue_id}, to=<{event.to}>"
    if isinstance(event, Quarantined):
        return (
            f"{event.queue_id}: quarantined, client={client_text(event.client)},"
            f" from=<{clean(event.sender)}>, nrcpt={len(event.recipients)},"
            f" reason={clean(event.reason)}"
        )
    return None


def accepted_line(event: MessageAccepted) -> str:
    c = event.client
    return (
        f"{event.queue_id}: queued, client={client_text(c)}, listener={c.listener},"
        f" profile={c.profile}, tls={tls_short(c.tls)}, size={event.size},"
        f" nrcpt={len(event.recipients)}, message-id={clean(event.message_id) or '-'},"
        f" from=<{clean(event.sender)}>"
    )


def delivery_line(event: DeliveryAttempt) -> str:
    a, b, c, d = (seconds(x) for x in event.delays)
    return (
        f"{event.queue_id}: to=<{clean(event.recipient)}>, relay={clean(event.relay)},"
        f" connector={event.connector}, delay={seconds(event.delay)}, delays={a}/{b}/{c}/{d},"
        f" dsn={event.dsn}, tls={tls_short(event.tls)},"
        f" verified={_verified(event)},"
        f" status={event.status} ({clean(event.reply)})"
    )


def _verified(event: DeliveryAttempt) -> str:
    if not event.verified:
        return "no"
    return event.verified_by or "yes"


def refused_line(event: Refused) -> str:
    c = event.client
    where = event.queue_id or "NOQUEUE"
    facts = [f"from=<{clean(event.sender)}>"] if event.sender is not None else []
    facts += [f"to=<{clean(event.recipient)}>"] if event.recipient is not None else []
    if event.stage == "CONNECT":
        facts += [f"listener={c.listener}", f"profile={c.profile}"]
    else:
        facts += [f"proto={'ESMTP' if c.esmtp else 'SMTP'}", f"helo=<{clean(c.helo)}>"]
    return (
        f"{where}: reject: {event.stage} from {client_text(c)}: {clean(event.reply)};"
        f" {' '.join(facts)}"
    )


class MailLog:
    """The subscriber that writes the lines (``hub.subscribe(MailLog())``)."""

    def __init__(self) -> None:
        self.log = logs.get_logger("smtpgate.mail")

    def __call__(self, event: Event) -> None:
        if logs.current["level"] not in ("debug", "info"):  # the lines are info: not written
            return
        text = line(event)
        if text is not None:
            logs.mail_line(self.log, text, event)
