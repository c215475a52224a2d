"""SASL PLAIN (RFC 4616) and LOGIN exchanges for SMTP AUTH (RFC 4954), sans-IO.

The exchange turns the client's decoded responses into either a challenge
to send (as ``334``) or a user name and password to verify; it never sees a
socket and never logs. Authorisation identities other than the user itself
(PLAIN's authzid) are refused: nobody may act for someone else.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpgate.proto.replies import Reply

MECHANISMS = ("PLAIN", "LOGIN")
MALFORMED = Reply.of(501, "5.5.2", "Error: malformed authentication response")
NOT_AUTHORISED = Reply.of(535, "5.7.8", "Authentication credentials invalid")


@dataclass(frozen=True, slots=True)
class SaslStep:
    """What the exchange wants next: a challenge, a verification, or a refusal."""

    challenge: bytes | None = None
    username: str | None = None
    password: str | None = None
    failure: Reply | None = None


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class SaslExchange:
    """One AUTH exchange for ``PLAIN`` or ``LOGIN``."""

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported mechanism {mechanism}")
        self.mechanism = mechanism
        self._username: str | None = None

    def start(self, initial: bytes | None) -> SaslStep:
        if initial is None:
            return SaslStep(challenge=b"" if self.mechanism == "PLAIN" else b"Username:")
        return self.respond(initial)

    def respond(self, data: bytes) -> SaslStep:
        if self.mechanism == "PLAIN":
            return self._plain(data)
        text = _text(data)
        if text is None or "\x00" in text:
            return SaslStep(failure=MALFORMED)
        if self._username is None:
            self._username = text
            return SaslStep(challenge=b"Password:")
        return SaslStep(username=self._username, password=text)

    def _plain(self, data: bytes) -> SaslStep:
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return SaslStep(failure=MALFORMED)
        authzid, authcid, password = (_text(p) for p in parts)
        if authzid is None or authcid is None or password is None or not authcid:
            return SaslStep(failure=MALFORMED)
        if authzid and authzid != authcid:
            return SaslStep(failure=NOT_AUTHORISED)  # no acting for another user
        return SaslStep(username=authcid, password=password)
