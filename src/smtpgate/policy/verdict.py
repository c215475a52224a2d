"""Decisions as values: accept, or refuse with the reply the client gets."""

from __future__ import annotations

from dataclasses import dataclass

from smtpgate.proto.replies import Reply


@dataclass(frozen=True, slots=True)
class Verdict:
    """A policy decision and why it was made."""

    reply: Reply | None  # None: accept with the session's usual positive reply
    reason: str

    @classmethod
    def accept(cls, reason: str) -> Verdict:
        return cls(None, reason)

    @classmethod
    def reject(cls, reply: Reply, reason: str) -> Verdict:
        if reply.code < 400:
            raise ValueError("a rejection needs a 4xx or 5xx reply")
        return cls(reply, reason)

    @property
    def accepted(self) -> bool:
        return self.reply is None
