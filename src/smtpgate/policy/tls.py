"""What TLS does policy require? (inbound now; outbound with the TLS work)

Inbound: a profile's mandatory TLS overrides the global opportunistic
setting. The profile found by client IP or host name decides; a profile
selected by the sender domain at MAIL FROM can add the requirement too (that
is all a sender domain ever does). MAIL without TLS then gets ``530 5.7.0``.
"""

from __future__ import annotations

from smtpgate.policy.profile import ProfileMatch
from smtpgate.policy.verdict import Verdict
from smtpgate.proto.replies import Reply

MUST_STARTTLS = Reply.of(530, "5.7.0", "Must issue a STARTTLS command first")


def inbound_tls_required(connection: ProfileMatch, sender: ProfileMatch | None) -> tuple[bool, str]:
    if connection.profile.mandatory_tls:
        return True, f"{connection.profile.label} requires inbound TLS"
    if sender is not None and sender.profile.mandatory_tls:
        return True, f"{sender.reason()} requires inbound TLS"
    return False, "TLS is opportunistic (offered where the listener can)"


def decide_mail_tls(required: bool, why: str, tls_active: bool) -> Verdict:
    if required and not tls_active:
        return Verdict.reject(MUST_STARTTLS, why)
    return Verdict.accept(why if required else "TLS not required")
