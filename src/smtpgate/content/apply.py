"""Writing an accepted message's verdicts into it: the scanners' header fields
on top, the Subject rewritten when a scanner asked, forged results dropped."""

from __future__ import annotations

from collections.abc import Callable

from smtpgate.content.headers import edit_head
from smtpgate.content.verdict import Outcome
from smtpgate.spool import SpooledBody


def write_verdicts(
    body: SpooledBody, outcome: Outcome, drop: Callable[[bytes], bool] | None = None
) -> None:
    """Edit ``body``'s head in place (nothing to do: nothing is touched)."""
    if not outcome.headers and not outcome.subject_prefix and drop is None:
        return
    head = body.head()
    new = edit_head(head, outcome.headers, outcome.subject_prefix, drop)
    if new != head:
        body.replace_head(new, len(head))
