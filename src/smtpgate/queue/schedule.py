"""When to try again, and what a reply means for a recipient. Pure.

* A 2xx final reply delivers; a 4xx, or no reply at all (connection refused,
  timeout, TLS required but impossible), defers; a 5xx bounces at once
  (RFC 5321 §4.2.1).
* Retries back off exponentially from ``retry.first``, doubling per failed
  attempt up to ``retry.max_backoff``, with ±10 % jitter so that a queue of
  messages deferred together does not retry in lock-step (Postfix spreads
  its queue runs the same way).
* A recipient still undelivered ``retry.lifetime`` after the message arrived
  bounces ("message expired", 4.4.7 as RFC 3463 names it).
"""

from __future__ import annotations

from typing import Literal

from smtpgate.config.schema import RetrySettings

Fate = Literal["delivered", "deferred", "bounced"]


def fate_of(code: int | None) -> Fate:
    if code is None or 400 <= code < 500:
        return "deferred"
    if 200 <= code < 300:
        return "delivered"
    return "bounced"


def backoff(failed_attempts: int, retry: RetrySettings, jitter: float) -> float:
    """Seconds until the next attempt; ``jitter`` is a number in [0, 1)."""
    exponent = max(0, failed_attempts - 1)
    base: float = min(retry.max_backoff, retry.first * float(2 ** min(exponent, 32)))
    return base * (0.9 + 0.2 * jitter)


def expired(arrival: float, now: float, retry: RetrySettings) -> bool:
    return now - arrival >= retry.lifetime


def delay_warning_due(arrival: float, now: float, after: float | None, warned: bool) -> bool:
    return after is not None and not warned and now - arrival >= after
