"""Envelope data: MAIL and RCPT parameters and the envelope of one message.

These are values only. Parsing lives in ``smtpgate.proto.grammar``; the rules
about which parameters exist come from RFC 1870 (SIZE), RFC 6152 (8BITMIME),
RFC 6531 (SMTPUTF8), RFC 3461 (DSN) and RFC 4954 §5 (AUTH=).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Notify = Literal["SUCCESS", "FAILURE", "DELAY"]


@dataclass(frozen=True, slots=True)
class MailParams:
    """Parameters of MAIL FROM."""

    size: int | None = None
    body: Literal["7BIT", "8BITMIME"] | None = None
    smtputf8: bool = False
    ret: Literal["FULL", "HDRS"] | None = None  # RFC 3461 §4.3
    envid: str | None = None  # RFC 3461 §4.4, xtext-decoded
    auth: str | None = None  # RFC 4954 §5, xtext-decoded; "<>" when unknown

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the queue's and the quarantine's records."""
        return {
            "size": self.size,
            "body": self.body,
            "smtputf8": self.smtputf8,
            "ret": self.ret,
            "envid": self.envid,
            "auth": self.auth,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MailParams:
        return cls(
            size=raw.get("size"),
            body=raw.get("body"),
            smtputf8=bool(raw.get("smtputf8")),
            ret=raw.get("ret"),
            envid=raw.get("envid"),
            auth=raw.get("auth"),
        )


@dataclass(frozen=True, slots=True)
class RcptParams:
    """Parameters of RCPT TO (RFC 3461 §4.1, §4.2)."""

    notify: frozenset[Notify] | None = None  # empty set means NEVER
    orcpt: tuple[str, str] | None = None  # (address type, decoded address)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the queue's and the quarantine's records."""
        return {
            "notify": sorted(self.notify) if self.notify is not None else None,
            "orcpt": list(self.orcpt) if self.orcpt else None,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RcptParams:
        notify, orcpt = raw.get("notify"), raw.get("orcpt")
        return cls(
            notify=frozenset(notify) if notify is not None else None,
            orcpt=(orcpt[0], orcpt[1]) if orcpt else None,
        )


@dataclass(frozen=True, slots=True)
class Recipient:
    """One accepted recipient with its DSN parameters."""

    address: str
    params: RcptParams = field(default_factory=RcptParams)


@dataclass(frozen=True, slots=True)
class Envelope:
    """Everything about one message except its body."""

    sender: str
    recipients: tuple[Recipient, ...]
    mail_params: MailParams = field(default_factory=MailParams)
    helo: str = ""
    client_ip: str = ""
    client_port: int = 0
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    auth_user: str | None = None
    spam_check: bool = True  # decided by the relay mode; travels with the message
    profile: str = ""  # the connection profile that accepted it
