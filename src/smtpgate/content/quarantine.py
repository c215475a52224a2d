"""The quarantine: messages held by a scanner's verdict (to be built).

Node-local and durable like the queue: a held message is fsynced before the
client hears 250, with its envelope and the verdicts that held it.
"""

from __future__ import annotations

from typing import Protocol

from smtpgate.content.verdict import Outcome
from smtpgate.model.envelope import Envelope
from smtpgate.spool import SpooledBody


class Quarantine(Protocol):
    async def hold(self, envelope: Envelope, body: SpooledBody, outcome: Outcome) -> None:
        """Keep the message (durably) with the verdicts that held it."""
