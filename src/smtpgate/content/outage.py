"""A server a scanner depends on being down: logged once when the outage starts
and once when it ends (never once per message), and readable as state for the
node's status (``registry.states``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smtpgate.observe.log import get_logger

log = get_logger("smtpgate.content")


@dataclass
class Outage:
    went_down: str  # the log event at the start, e.g. "clamd unavailable"
    came_back: str  # ... and at the end, e.g. "clamd reachable again"
    down: str | None = None  # why, during an outage

    def failed(self, why: str, **facts: Any) -> None:
        if self.down is None:
            log.warning(self.went_down, error=why, **facts)
        self.down = why

    def answered(self) -> None:
        if self.down is not None:
            log.info(self.came_back, was=self.down)
            self.down = None
