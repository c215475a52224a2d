"""Table tests for the queue's schedule: what a reply means for a recipient, the
backoff, expiry, delay warnings and which report an outcome calls for."""

from __future__ import annotations

import pytest

from smtpgate.config.schema import QueueSettings, RetrySettings
from smtpgate.model.envelope import Notify
from smtpgate.queue.dsn import Action
from smtpgate.queue.schedule import (
    Outcome,
    backoff,
    decide,
    delay_warning_due,
    enhanced_status,
    expired,
    fate_of,
)
from smtpgate.queue.states import RecipientState

DELIVERED, DEFERRED, BOUNCED = (
    RecipientState.DELIVERED,
    RecipientState.DEFERRED,
    RecipientState.BOUNCED,
)
RETRY = RetrySettings(first=60, max_backoff=600, lifetime=3600)
SETTINGS = QueueSettings(retry=RETRY, delay_warning=900)
ARRIVAL = 1_700_000_000.0
SUCCESS: frozenset[Notify] = frozenset({"SUCCESS"})
NEVER: frozenset[Notify] = frozenset()


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (250, DELIVERED),
        (251, DELIVERED),
        (421, DEFERRED),
        (451, DEFERRED),
        (452, DEFERRED),
        (None, DEFERRED),  # no reply at all: refused, timed out, TLS impossible
        (500, BOUNCED),
        (550, BOUNCED),
        (554, BOUNCED),
        (354, BOUNCED),  # not a final success: never delivered
    ],
)
def test_the_reply_code_decides_the_fate(code: int | None, state: RecipientState) -> None:
    assert fate_of(code) is state


# failed attempts → seconds, with jitter 0.5 (the nominal interval)
@pytest.mark.parametrize(
    ("failed", "seconds"),
    [(0, 60), (1, 60), (2, 120), (3, 240), (4, 480), (5, 600), (6, 600), (1000, 600)],
)
def test_backoff_doubles_per_failed_attempt_up_to_max_backoff(failed: int, seconds: float) -> None:
    assert backoff(failed, RETRY, 0.5) == pytest.approx(seconds)


@pytest.mark.parametrize("failed", [1, 3, 5, 40])
@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.75, 0.999_999])
def test_jitter_stays_within_ten_percent(failed: int, jitter: float) -> None:
    nominal = backoff(failed, RETRY, 0.5)
    assert 0.9 * nominal <= backoff(failed, RETRY, jitter) < 1.1 * nominal


def test_jitter_spreads_the_interval_from_ninety_to_a_hundred_and_ten_percent() -> None:
    assert backoff(1, RETRY, 0.0) == pytest.approx(54)
    assert backoff(1, RETRY, 0.999_999) == pytest.approx(66, abs=1e-3)


@pytest.mark.parametrize(
    ("age", "is_expired"), [(0, False), (3599.9, False), (3600, True), (86400, True)]
)
def test_expiry_is_at_the_lifetime_after_arrival(age: float, is_expired: bool) -> None:
    assert expired(ARRIVAL, ARRIVAL + age, RETRY) is is_expired


@pytest.mark.parametrize(
    ("age", "after", "warned", "due"),
    [
        (899, 900, False, False),
        (900, 900, False, True),
        (5000, 900, False, True),
        (5000, 900, True, False),  # once only
        (5000, None, False, False),  # delay warnings off
    ],
)
def test_delay_warning_due(age: float, after: float | None, warned: bool, due: bool) -> None:
    assert delay_warning_due(ARRIVAL, ARRIVAL + age, after, warned) is due


@pytest.mark.parametrize(
    ("text", "code", "status"),
    [
        ("550 5.1.1 no such user", 550, "5.1.1"),
        ("5.1.10 null MX", 550, "5.1.10"),
        ("4.4.1 connection refused", None, "4.4.1"),
        ("250 2.0.0 ok", 250, "2.0.0"),
        ("mailbox busy", 451, "4.0.0"),
        ("go away", 554, "5.0.0"),
        ("", None, "4.0.0"),
        ("550 see 1.2.3.4 for why", 550, "5.0.0"),  # only the first two words count
    ],
)
def test_enhanced_status_of_a_reply(text: str, code: int | None, status: str) -> None:
    assert enhanced_status(text, code) == status


# (code, age, warned, notify, dsn_passed_on) → (state, report, warned after)
Row = tuple[
    int | None,
    float,
    bool,
    frozenset[Notify] | None,
    bool | None,
    RecipientState,
    Action | None,
    bool,
]
DECISIONS: list[Row] = [
    # delivered: a report only for NOTIFY=SUCCESS, and only if the next hop did not take DSN
    (250, 10, False, None, False, DELIVERED, None, False),
    (250, 10, False, SUCCESS, True, DELIVERED, None, False),
    (250, 10, False, SUCCESS, False, DELIVERED, "relayed", False),
    (250, 10, False, frozenset({"FAILURE", "SUCCESS"}), False, DELIVERED, "relayed", False),
    (250, 10, False, frozenset({"FAILURE"}), False, DELIVERED, None, False),
    (250, 10, False, NEVER, False, DELIVERED, None, False),
    (250, 10, True, SUCCESS, False, DELIVERED, "relayed", True),
    # deferred: quiet until delay_warning, then one "delayed" report
    (451, 10, False, None, False, DEFERRED, None, False),
    (None, 10, False, None, None, DEFERRED, None, False),
    (451, 900, False, None, False, DEFERRED, "delayed", True),
    (None, 900, False, None, None, DEFERRED, "delayed", True),
    (451, 900, True, None, False, DEFERRED, None, True),  # warned already: never twice
    (451, 3599, True, None, False, DEFERRED, None, True),
    (451, 900, False, NEVER, False, DEFERRED, "delayed", True),  # NOTIFY filters it later
    # bounced: 5xx at once; 4xx or no reply once the lifetime is over (expiry)
    (550, 10, False, None, False, BOUNCED, "failed", False),
    (550, 10, True, None, False, BOUNCED, "failed", True),
    (550, 5000, False, SUCCESS, False, BOUNCED, "failed", False),
    (451, 3600, False, None, False, BOUNCED, "failed", False),
    (451, 3600, True, None, False, BOUNCED, "failed", True),
    (None, 9999, False, None, None, BOUNCED, "failed", False),
]


@pytest.mark.parametrize(
    ("code", "age", "warned", "notify", "passed_on", "state", "report", "warned_after"),
    DECISIONS,
)
def test_decide_one_recipient(
    code: int | None,
    age: float,
    warned: bool,
    notify: frozenset[Notify] | None,
    passed_on: bool | None,
    state: RecipientState,
    report: Action | None,
    warned_after: bool,
) -> None:
    outcome = Outcome(code, 0, ARRIVAL, warned, notify, passed_on)
    decision = decide(outcome, ARRIVAL + age, SETTINGS, 0.5)
    assert (decision.state, decision.report, decision.warned) == (state, report, warned_after)


@pytest.mark.parametrize(
    ("attempts", "jitter", "after"),
    [(0, 0.5, 60), (1, 0.5, 120), (3, 0.5, 480), (9, 0.5, 600), (0, 0.0, 54), (2, 0.0, 216)],
)
def test_decide_schedules_the_next_attempt_by_the_backoff(
    attempts: int, jitter: float, after: float
) -> None:
    now = ARRIVAL + 100
    decision = decide(Outcome(451, attempts, ARRIVAL), now, SETTINGS, jitter)
    assert decision.next_attempt == pytest.approx(now + after)


def test_a_delay_warning_goes_out_exactly_once_over_a_recipients_life() -> None:
    """Replay a recipient deferred again and again: one warning, then the bounce."""
    now, warned, attempts, reports = ARRIVAL, False, 0, []
    while True:
        decision = decide(Outcome(451, attempts, ARRIVAL, warned), now, SETTINGS, 0.5)
        reports.append(decision.report)
        if decision.state is not DEFERRED:
            break
        now, warned, attempts = decision.next_attempt, decision.warned, attempts + 1
    assert [r for r in reports if r] == ["delayed", "failed"]
    assert decision.state is BOUNCED
    assert now - ARRIVAL >= RETRY.lifetime


def test_without_delay_warnings_a_deferral_is_never_reported() -> None:
    quiet = QueueSettings(retry=RETRY, delay_warning=None)
    decision = decide(Outcome(451, 5, ARRIVAL), ARRIVAL + 3000, quiet, 0.5)
    assert (decision.state, decision.report, decision.warned) == (DEFERRED, None, False)
