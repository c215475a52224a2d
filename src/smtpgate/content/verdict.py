"""What a scanner found, and what the gateway does with all of them together.

Pure values and one pure function, ``combine``: the strictest action wins
(reject > tempfail > quarantine > accept); among equals the first scanner
in the pipeline's order gives the reply. Headers of every scanner are kept
(in the pipeline's order), so an accepted message carries each verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from smtpgate.proto.replies import Reply

Action = Literal["accept", "reject", "tempfail", "quarantine"]
SEVERITY: dict[Action, int] = {"accept": 0, "quarantine": 1, "tempfail": 2, "reject": 3}


@dataclass(frozen=True)
class ScanResult:
    """One scanner's verdict on one message."""

    scanner: str  # "rspamd", "clamd", "dmarc", ...
    action: Action = "accept"
    reply: Reply | None = None  # the SMTP reply for reject and tempfail
    headers: tuple[tuple[str, str], ...] = ()  # header fields to add, in order
    subject_prefix: str = ""  # rewrite the Subject (rspamd's "rewrite subject")
    reason: str = ""  # one line for the log and the quarantine
    detail: dict[str, Any] = field(default_factory=dict)  # score, symbols, signature

    def __post_init__(self) -> None:
        if self.action in ("reject", "tempfail") and self.reply is None:
            raise ValueError(f"{self.scanner}: a {self.action} needs its SMTP reply")


@dataclass(frozen=True)
class Outcome:
    """All scanners' results for one message, combined."""

    action: Action
    reply: Reply | None
    results: tuple[ScanResult, ...]
    headers: tuple[tuple[str, str], ...]
    subject_prefix: str

    @property
    def decided_by(self) -> ScanResult | None:
        """The result that set the action (None when every scanner accepted)."""
        for result in self.results:
            if result.action == self.action and self.action != "accept":
                return result
        return None

    def summary(self) -> str:
        """One line: each scanner's action and reason."""
        return "; ".join(
            f"{r.scanner}: {r.action}" + (f" ({r.reason})" if r.reason else "")
            for r in self.results
        )


ACCEPTED = Outcome("accept", None, (), (), "")


def combine(results: Sequence[ScanResult]) -> Outcome:
    """The strictest action wins; its first scanner's reply is the reply."""
    if not results:
        return ACCEPTED
    action: Action = max((r.action for r in results), key=SEVERITY.__getitem__)
    reply = next((r.reply for r in results if r.action == action), None)
    headers = tuple(h for r in results for h in r.headers)
    prefix = next((r.subject_prefix for r in results if r.subject_prefix), "")
    return Outcome(action, reply, tuple(results), headers, prefix)
