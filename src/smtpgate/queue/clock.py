"""The queue's one source of time.

The store stamps arrivals and attempts, the manager decides what is due and
when a resting message may run again, and the schedule computes the next
attempt: all from the one ``Clock`` they are given, never from an inline
``time.time()``. Tests give them a fake clock and move time forward instead
of sleeping.

The time is wall-clock seconds since the epoch, not monotonic: it is stored
with each message, survives restarts and is shown by the queue tools.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    """The real time (``time.time``)."""

    def now(self) -> float:
        return time.time()


SYSTEM_CLOCK: Clock = SystemClock()
