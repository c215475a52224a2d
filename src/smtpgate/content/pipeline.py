"""Running the content checks of one message, concurrently, on its spooled body.

A ``Scanner`` says whether it applies to a message (``applies``: the profile's
spam-check decision, the direction, its own settings) and scans it. A scanner
must not raise: an unreachable server is its own decision (fail open: accept
and say so in a header; fail closed: 451). Should one raise anyway, the
message is deferred (451 4.3.0), never accepted unchecked and never lost.
Every scan is bounded by the scanner's own timeout and, as a last resort,
by ``DEADLINE`` here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from smtpgate.config.schema import GatewayConfig
from smtpgate.content.verdict import Outcome, ScanResult, combine
from smtpgate.model.envelope import Envelope
from smtpgate.observe.log import get_logger
from smtpgate.proto.replies import Reply
from smtpgate.spool import SpooledBody

log = get_logger("smtpgate.content")

DEADLINE = 300.0  # seconds: no scan may hold a session longer than this
CHECK_FAILED = Reply.of(451, "4.3.0", "Content check failed, try again later")


@dataclass(frozen=True)
class MessageFacts:
    """What the scanners may know about a message besides its body."""

    queue_id: str
    envelope: Envelope
    hostname: str  # ours: the authserv-id, the rspamd "MTA-Name"
    client_name: str | None = None  # the forward-confirmed name, if any
    internal: bool = False  # from inside: trusted relay rights (full, restricted-internal)

    @property
    def client_ip(self) -> str:
        return self.envelope.client_ip

    @property
    def spam_check(self) -> bool:
        """The profile's decision (relay mode defaults, ``spam.check_outbound``)."""
        return self.envelope.spam_check


class Scanner(Protocol):
    """One content check."""

    name: str

    def applies(self, facts: MessageFacts, config: GatewayConfig) -> bool:
        """Whether this message is to be checked, by the configuration."""

    async def scan(
        self, facts: MessageFacts, body: SpooledBody, config: GatewayConfig
    ) -> ScanResult:
        """The verdict; never raises (a failing server is a verdict too)."""


async def scan(
    facts: MessageFacts,
    body: SpooledBody,
    config: GatewayConfig,
    scanners: Sequence[Scanner],
) -> Outcome:
    """Every applicable scanner, concurrently; their results combined."""
    chosen = [s for s in scanners if s.applies(facts, config)]
    if not chosen:
        return combine([])
    results = await asyncio.gather(*(_guarded(s, facts, body, config) for s in chosen))
    outcome = combine(results)
    log.info(
        "content checked",
        queue_id=facts.queue_id,
        action=outcome.action,
        checks=outcome.summary(),
    )
    return outcome


async def _guarded(
    scanner: Scanner, facts: MessageFacts, body: SpooledBody, config: GatewayConfig
) -> ScanResult:
    try:
        async with asyncio.timeout(DEADLINE):
            return await scanner.scan(facts, body, config)
    except Exception as exc:
        log.error("content check failed", scanner=scanner.name, error=repr(exc))
        return ScanResult(
            scanner.name, "tempfail", CHECK_FAILED, reason=f"check failed: {type(exc).__name__}"
        )
