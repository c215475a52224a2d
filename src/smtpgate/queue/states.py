"""The queue's vocabulary: recipient states and message kinds.

The values are what the database stores and what ``smtpgate queue list``,
``queue show`` and the REST API show, so they never change (no migration).
A ``StrEnum`` member *is* its string: it goes into SQL, JSON and log lines
as the plain value.

A recipient's life::

    queued ──► delivered                      (2xx)
       │  └──► bounced                        (5xx, or expired: 4.4.7)
       ▼
    deferred ──► (due again at next_attempt: as queued)
    held     ◄─► queued/deferred              (queue hold / release)
    bounce   ──► bounced at the next run      (queue bounce)
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Literal, get_args


class RecipientState(StrEnum):
    QUEUED = "queued"  # waiting for its first attempt (or released, or retried now)
    DEFERRED = "deferred"  # failed for now; due again at its next attempt
    HELD = "held"  # `smtpgate queue hold`: never due until released
    BOUNCE = "bounce"  # `smtpgate queue bounce`: bounce, with a report, at the next run
    DELIVERED = "delivered"  # final: the next hop took it
    BOUNCED = "bounced"  # final: refused or expired; a report went as NOTIFY asked


# The message stays in the queue while one of its recipients is in one of these.
PENDING = (
    RecipientState.QUEUED,
    RecipientState.DEFERRED,
    RecipientState.HELD,
    RecipientState.BOUNCE,
)
# The same names as a type, for the API's filters (its OpenAPI schema lists them).
PendingState = Literal["queued", "deferred", "held", "bounce"]
assert set(get_args(PendingState)) == {str(state) for state in PENDING}
# The manager picks these up once their next attempt has come.
DUE = (RecipientState.QUEUED, RecipientState.DEFERRED, RecipientState.BOUNCE)
# A run attempts delivery to these (a BOUNCE recipient is bounced, not attempted).
ATTEMPTABLE = (RecipientState.QUEUED, RecipientState.DEFERRED)


class MessageKind(IntEnum):
    """What a queued message is; stored as its integer, shown as its label."""

    MAIL = 0  # mail from a client (or the credentials message)
    REPORT = 1  # a report to a sender: if undeliverable, reported to the administrator
    ADMIN_REPORT = 2  # a report to the administrator: if undeliverable, dropped

    @property
    def label(self) -> str:
        """``mail``, ``report`` or ``admin-report``, as the queue tools show it."""
        return self.name.lower().replace("_", "-")
