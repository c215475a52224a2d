"""Writing an accepted message's verdicts into it: the scanners' header fields
on top, the Subject rewritten when a scanner asked, forged results dropped.

A field our scanners write (``X-Spam-Status``, ``X-Virus-Scanned``, ...) that
the message already carries is the sender's, not ours: it is removed with its
whole family (every ``X-Spam-*`` once we write one), so a spammer cannot
arrive pre-labelled ``X-Spam-Flag: NO``. ``Authentication-
Results`` fields are the exception: other hops' are kept, and the sender
authentication check names the forged ones (``drop``).
"""

from __future__ import annotations

from collections.abc import Callable

from smtpgate.content.headers import edit_head
from smtpgate.content.verdict import Outcome
from smtpgate.spool import SpooledBody

KEPT = frozenset({b"authentication-results", b"received", b"dkim-signature"})


def write_verdicts(
    body: SpooledBody, outcome: Outcome, drop: Callable[[bytes], bool] | None = None
) -> None:
    """Edit ``body``'s head in place (nothing to do: nothing is touched)."""
    if not outcome.headers and not outcome.subject_prefix and drop is None:
        return
    head = body.head()
    new = edit_head(head, outcome.headers, outcome.subject_prefix, _either(drop, outcome))
    if new != head:
        body.replace_head(new, len(head))


def _either(drop: Callable[[bytes], bool] | None, outcome: Outcome) -> Callable[[bytes], bool]:
    ours = {name.lower().encode("ascii", "replace") for name, _value in outcome.headers} - KEPT
    families = tuple(_family(name) for name in ours if name.startswith(b"x-"))

    def dropped(item: bytes) -> bool:
        name = item.split(b":", 1)[0].strip().lower()
        if name in ours or (families and name.startswith(families)):
            return True
        return drop is not None and drop(item)

    return dropped


def _family(name: bytes) -> bytes:
    """``x-spam-status`` → ``x-spam-``: the fields one scanner owns."""
    parts = name.split(b"-")
    return b"-".join(parts[:2]) + b"-" if len(parts) > 2 else name
