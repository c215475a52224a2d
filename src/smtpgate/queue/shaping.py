"""Per-destination shaping: concurrent connections, messages per connection, rate.

A destination is what the queue manager groups attempts by: the recipient
domain for DNS MX delivery, ``host:port`` for a smarthost; each send
connector shapes its own. The limits of a (connector, destination) pair come
from the first ``queue.shaping`` rule whose ``connector`` and ``destination``
patterns both match (``*`` and ``?``, case-insensitive; ``[`` is literal),
each limit a rule leaves out from the defaults, which are Postfix's:

* ``concurrency``: attempts at once (``queue.destination_concurrency``, 20:
  ``default_destination_concurrency_limit``);
* ``messages_per_connection``: transactions on one connection before it is
  closed instead of kept for reuse (0: no limit, as
  ``smtp_connection_reuse_count_limit``);
* ``rate_per_minute``: attempt starts per minute, evenly spaced (none: as
  ``default_destination_rate_delay`` 0).

**Feedback** (Postfix's concurrency feedback, simplified): a reply that says
the destination has too many connections from us — a 421 (as the greeting
or any reply), or a text with "too many connections|sessions|concurrent" —
halves the pair's concurrency
(at least 1) and holds it there for ``queue.shaping_feedback_hold`` (5
minutes); after that, each attempt that reached the server without such a
reply raises it by one, back up to the configured limit. Logged as
``destination concurrency`` with the old and new limit and why.

Waiting for a slot or for the rate happens in memory, off the inbound path;
the messages stay in the queue (durable) meanwhile.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from smtpgate.config.schema import QueueSettings, ShapingRule
from smtpgate.delivery.attempt import AttemptReport
from smtpgate.observe.log import get_logger

log = get_logger("smtpgate.queue")

TOO_MANY = re.compile(
    r"too many (connections|sessions|concurrent|simultaneous)|did not greet with 220 \(421\b",
    re.IGNORECASE,
)
MAX_PAIRS = 10_000  # bounded: pairs without anyone in flight are forgotten beyond this


MAX_REMEMBERED = 10_000  # (connector, destination) limits kept; then forgotten at once


def _matches(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value.lower(), pattern.lower().replace("[", "[[]"))


@dataclass(frozen=True)
class Limits:
    concurrency: int
    messages_per_connection: int  # 0: unlimited
    rate_per_minute: float | None


def limits_for(settings: QueueSettings, connector: str, destination: str) -> Limits:
    rule: ShapingRule | None = next(
        (
            r
            for r in settings.shaping
            if _matches(r.connector, connector) and _matches(r.destination, destination)
        ),
        None,
    )
    concurrency = settings.destination_concurrency
    per_connection, rate = 0, None
    if rule is not None:
        concurrency = rule.concurrency or concurrency
        per_connection = rule.messages_per_connection or 0
        rate = rule.rate_per_minute
    return Limits(concurrency, per_connection, rate)


def too_many_connections(report: AttemptReport) -> bool:
    """Does the destination say we hold too many connections to it?"""
    return any(o.code == 421 or TOO_MANY.search(o.text) for o in report.outcomes)


@dataclass
class _Pair:
    limit: int  # the concurrency in force (lowered by feedback)
    inflight: int = 0
    held_until: float = 0.0  # no increase before this (monotonic)
    next_start: float = 0.0  # the rate: the earliest next attempt start (monotonic)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class Shaper:
    """The pairs' slots; ``settings`` returns the running queue settings."""

    def __init__(
        self,
        settings: Callable[[], QueueSettings],
        clock: Callable[[], float] = time.monotonic,
        share: int = 1,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # worker processes deliver side by side, each shaping alone: each takes its
        # share of a pair's concurrency and rate (at least one connection each)
        self.share = share
        self._pairs: dict[tuple[str, str], _Pair] = {}
        # limits_for is pure: remembered per settings object (a new one per apply)
        self._limits: tuple[QueueSettings | None, dict[tuple[str, str], Limits]] = (None, {})

    def limits(self, connector: str, destination: str) -> Limits:
        settings = self.settings()
        known, cache = self._limits
        if known is not settings or len(cache) >= MAX_REMEMBERED:
            cache = {}
            self._limits = (settings, cache)
        found = cache.get((connector, destination))
        if found is None:
            found = limits_for(settings, connector, destination)
            if self.share > 1:
                rate = found.rate_per_minute
                found = Limits(
                    max(1, found.concurrency // self.share),
                    found.messages_per_connection,
                    rate / self.share if rate else None,
                )
            cache[(connector, destination)] = found
        return found

    def _pair(self, connector: str, destination: str) -> _Pair:
        key = (connector, destination)
        found = self._pairs.get(key)
        if found is None:
            if len(self._pairs) >= MAX_PAIRS:
                for idle in [k for k, p in self._pairs.items() if p.inflight == 0][:1000]:
                    del self._pairs[idle]
            found = self._pairs[key] = _Pair(self.limits(connector, destination).concurrency)
        return found

    def concurrency(self, connector: str, destination: str) -> int:
        """The concurrency in force for the pair (after feedback)."""
        found = self._pairs.get((connector, destination))
        return found.limit if found else self.limits(connector, destination).concurrency

    @asynccontextmanager
    async def slot(self, connector: str, destination: str) -> AsyncIterator[None]:
        """Wait for a free connection slot, then for the rate; hold the slot."""
        pair = self._pair(connector, destination)
        limits = self.limits(connector, destination)
        pair.limit = min(pair.limit, limits.concurrency)  # a lowered setting applies at once
        async with pair.changed:
            await pair.changed.wait_for(lambda: pair.inflight < pair.limit)
            pair.inflight += 1
        try:
            if limits.rate_per_minute:
                now = self.clock()
                start = max(now, pair.next_start)
                pair.next_start = start + 60.0 / limits.rate_per_minute
                if start > now:
                    await asyncio.sleep(start - now)
            yield
        finally:
            async with pair.changed:
                pair.inflight -= 1
                pair.changed.notify_all()

    async def feedback(self, connector: str, destination: str, report: AttemptReport) -> None:
        """Lower the pair's concurrency on "too many connections", raise it again after."""
        pair = self._pair(connector, destination)
        configured = self.limits(connector, destination).concurrency
        now = self.clock()
        before = pair.limit
        if too_many_connections(report):
            pair.limit = max(1, min(pair.limit, pair.inflight + 1) // 2)
            pair.held_until = now + self.settings().shaping_feedback_hold
            why = "the destination has too many connections from us"
        elif report.reached and now >= pair.held_until and pair.limit < configured:
            pair.limit += 1
            why = "recovering"
        else:
            return
        if pair.limit != before:
            level = log.warning if pair.limit < before else log.info
            level(
                "destination concurrency",
                connector=connector,
                destination=destination,
                limit=pair.limit,
                was=before,
                why=why,
            )
            async with pair.changed:
                pair.changed.notify_all()

    def per_connection(self, connector: str, destination: str) -> int:
        return self.limits(connector, destination).messages_per_connection
