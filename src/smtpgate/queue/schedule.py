"""What a reply means for a recipient, when to try again, and which report is due. Pure.

* A 2xx final reply delivers; a 4xx, or no reply at all (connection refused,
  timeout, TLS required but impossible), defers; a 5xx bounces at once
  (RFC 5321 §4.2.1).
* Retries back off exponentially from ``retry.first``, doubling per failed
  attempt up to ``retry.max_backoff``, with ±10 % jitter so that a queue of
  messages deferred together does not retry in lock-step (Postfix spreads
  its queue runs the same way).
* A recipient still undelivered ``retry.lifetime`` after the message arrived
  bounces ("message expired", 4.4.7 as RFC 3463 names it).
* Reports: a bounce calls for a "failed" report; a deferral past
  ``delay_warning`` calls for one "delayed" report, once per recipient; a
  delivery calls for a "relayed" report only when NOTIFY asked for SUCCESS
  and the next hop did not take the DSN request on (else it reports itself).
  Whether the sender gets the report is NOTIFY's business (``dsn.wants_report``).

:func:`decide` is the whole decision for one recipient's outcome; the
manager applies it. Time and jitter are arguments, so the tables in
``tests/test_schedule.py`` pin it down without a clock or a sleep.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpgate.config.schema import QueueSettings, RetrySettings
from smtpgate.model.envelope import Notify
from smtpgate.queue.dsn import Action
from smtpgate.queue.states import RecipientState

EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired


@dataclass(frozen=True)
class Outcome:
    """One recipient's result of one attempt, with what the decision depends on."""

    code: int | None  # the final reply's code; None when no server answered
    attempts: int  # attempts made before this one
    arrival: float  # when the message entered the queue
    warned: bool = False  # a delay warning went out already
    notify: frozenset[Notify] | None = None  # NOTIFY as given at RCPT; None if not given
    dsn_passed_on: bool | None = None  # the next hop took the DSN request; None: no next hop


@dataclass(frozen=True)
class Decision:
    state: RecipientState  # DELIVERED, DEFERRED or BOUNCED
    next_attempt: float
    report: Action | None  # the report this outcome calls for, if any
    warned: bool  # a delay warning has gone out (this decision's included)


def decide(outcome: Outcome, now: float, settings: QueueSettings, jitter: float) -> Decision:
    """The recipient's new state, next attempt and report; ``jitter`` is in [0, 1)."""
    state = fate_of(outcome.code)
    if state is RecipientState.DEFERRED and expired(outcome.arrival, now, settings.retry):
        state = RecipientState.BOUNCED
    next_attempt = now + backoff(outcome.attempts + 1, settings.retry, jitter)
    report, warned = _report(state, outcome, now, settings.delay_warning)
    return Decision(state, next_attempt, report, warned)


def _report(
    state: RecipientState, outcome: Outcome, now: float, delay_warning: float | None
) -> tuple[Action | None, bool]:
    if state is RecipientState.BOUNCED:
        return "failed", outcome.warned
    if state is RecipientState.DEFERRED:
        if delay_warning_due(outcome.arrival, now, delay_warning, outcome.warned):
            return "delayed", True
        return None, outcome.warned
    if outcome.dsn_passed_on is False and outcome.notify and "SUCCESS" in outcome.notify:
        return "relayed", outcome.warned
    return None, outcome.warned


def fate_of(code: int | None) -> RecipientState:
    if code is None or 400 <= code < 500:
        return RecipientState.DEFERRED
    if 200 <= code < 300:
        return RecipientState.DELIVERED
    return RecipientState.BOUNCED


def backoff(failed_attempts: int, retry: RetrySettings, jitter: float) -> float:
    """Seconds until the next attempt; ``jitter`` is a number in [0, 1)."""
    exponent = max(0, failed_attempts - 1)
    base: float = min(retry.max_backoff, retry.first * float(2 ** min(exponent, 32)))
    return base * (0.9 + 0.2 * jitter)


def expired(arrival: float, now: float, retry: RetrySettings) -> bool:
    return now - arrival >= retry.lifetime


def delay_warning_due(arrival: float, now: float, after: float | None, warned: bool) -> bool:
    return after is not None and not warned and now - arrival >= after


def enhanced_status(text: str, code: int | None) -> str:
    """The enhanced status code in ``"550 5.1.1 ..."`` or ``"4.4.1 ..."``; else a
    generic one for the reply's class."""
    for word in text.split(" ", 2)[:2]:
        if word.count(".") == 2 and word.replace(".", "").isdigit():
            return word
    return "4.0.0" if code is None or code < 500 else "5.0.0"
