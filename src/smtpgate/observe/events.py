"""What happened to mail, as typed events, and the hub that hands them out.

The gateway publishes one event per fact an operator asks about (a message
accepted, a command refused, a recipient's delivery attempt, a report sent);
the mail log (``observe.maillog``), the metrics (``observe.metrics``) and the
tracking store (``observe.tracking``) subscribe. The hub does no I/O: it calls
each subscriber synchronously, in the publisher's thread, and a subscriber that
raises is logged once (by its name) and never disturbs the publisher or the
other subscribers. Subscribers must therefore be quick: anything slow (a
database write) is queued by the subscriber and done elsewhere.

Events carry facts, never a password and never a message body.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from smtpgate.observe.log import get_logger

log = get_logger("smtpgate.events")

MAX_MESSAGE_ID = 998  # RFC 5322 §2.1.1: a header line is at most 998 octets


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class Client:
    """Who talked to us: address, confirmed name ("unknown" without), and the
    listener, profile, HELO name and TLS of the session."""

    ip: str
    name: str = "unknown"
    listener: str = ""
    profile: str = ""
    helo: str = ""
    esmtp: bool = True
    tls: str | None = None


@dataclass(frozen=True)
class Connected:
    """A connection passed the connect policy (it was greeted with 220)."""

    client: Client
    when: float = field(default_factory=_now)


@dataclass(frozen=True)
class MessageAccepted:
    """A message is durable in the queue (the client heard 250)."""

    queue_id: str
    client: Client
    sender: str
    recipients: tuple[str, ...]
    size: int
    message_id: str = ""
    verdicts: tuple[tuple[str, str], ...] = ()  # (scanner or decision, result)
    when: float = field(default_factory=_now)


Stage = Literal["CONNECT", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "AUTH"]


@dataclass(frozen=True)
class Refused:
    """A connection, command or message was refused (Postfix's ``NOQUEUE: reject``).
    ``queue_id`` is set when the message had one (a refusal at the end of DATA);
    ``first``: for connections, whether this refusal is logged in full (the
    rest of a flood is summarised by ``inbound.server.RefusalLog``)."""

    stage: Stage
    client: Client
    code: int
    enhanced: str | None
    reply: str
    reason: str
    sender: str | None = None
    recipient: str | None = None
    queue_id: str = ""
    first: bool = True
    when: float = field(default_factory=_now)


@dataclass(frozen=True)
class ContentVerdict:
    """What the scanners said about one message before the reply."""

    queue_id: str
    action: str  # accept, reject, tempfail, quarantine, ...
    results: tuple[tuple[str, str], ...]  # (scanner, its verdict)
    when: float = field(default_factory=_now)


Status = Literal["sent", "deferred", "bounced"]


@dataclass(frozen=True)
class DeliveryAttempt:
    """One recipient's outcome of one delivery attempt. ``delays``: seconds
    (before this attempt in the queue, waiting for a delivery slot, connection
    set-up including DNS, TLS and AUTH, transmission)."""

    queue_id: str
    recipient: str
    connector: str
    relay: str  # "host[ip]:port", or "none" when no server was reached
    delay: float  # since the message arrived
    delays: tuple[float, float, float, float]
    dsn: str  # the enhanced status, e.g. 2.0.0
    status: Status
    reply: str  # the remote reply, or why there was none
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    verified: bool = False  # the next hop's certificate was validated
    attempt: int = 1
    when: float = field(default_factory=_now)
    verified_by: str = ""  # "dane" or "mta-sts" when the domain's policy asked for it


@dataclass(frozen=True)
class DsnSent:
    """A delivery status notification about ``about`` was queued as ``queue_id``."""

    queue_id: str
    about: str
    action: str  # failed, delayed, delivered
    to: str
    when: float = field(default_factory=_now)


@dataclass(frozen=True)
class Quarantined:
    queue_id: str
    client: Client
    sender: str
    recipients: tuple[str, ...]
    reason: str
    when: float = field(default_factory=_now)


Event = (
    Connected | MessageAccepted | Refused | ContentVerdict | DeliveryAttempt | DsnSent | Quarantined
)
Subscriber = Callable[[Event], None]


class Hub:
    """Synchronous publish/subscribe; no I/O of its own."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._failed: set[str] = set()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; the returned function removes it."""
        self._subscribers.append(subscriber)

        def remove() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return remove

    def publish(self, event: Event) -> None:
        for subscriber in tuple(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:
                name = getattr(subscriber, "__qualname__", repr(subscriber))
                if name not in self._failed:  # once: a broken subscriber must not flood
                    self._failed.add(name)
                    log.error("event subscriber failed", subscriber=name, error=repr(exc))


hub = Hub()  # the process's one hub: the gateway publishes, app.py subscribes
publish = hub.publish


def message_id(head: bytes) -> str:
    """The Message-ID of a message head (cheap: a scan of the header lines, no
    parser), without angle brackets' surroundings; "" when there is none."""
    end = head.find(b"\r\n\r\n")
    lines = (head if end < 0 else head[:end]).split(b"\r\n")
    for i, line in enumerate(lines):
        if line[:11].lower() == b"message-id:":
            value = line[11:]
            for more in lines[i + 1 :]:  # folded onto the next lines
                if more[:1] not in (b" ", b"\t"):
                    break
                value += more
            return value.strip().decode("utf-8", "replace")[:MAX_MESSAGE_ID]
    return ""
