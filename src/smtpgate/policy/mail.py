"""The decisions made at MAIL FROM, in the server's order.

One function, so that the session handler and ``policy explain`` can never
disagree: the inbound TLS requirement (the connection's profile, or the one
the sender domain selects), then spoof detection, then whether the message
will be spam-checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpgate.config.schema import GatewayConfig
from smtpgate.policy.profile import ProfileIndex, ProfileMatch, match_sender_domain
from smtpgate.policy.relay import RelayRights, decide_sender, spam_checked, split_address
from smtpgate.policy.tls import decide_mail_tls, inbound_tls_required
from smtpgate.policy.verdict import Verdict


@dataclass(frozen=True)
class MailDecision:
    tls_required: bool
    tls: Verdict
    sender: Verdict
    spam_check: tuple[bool, str]

    @property
    def refusal(self) -> Verdict | None:
        """The first verdict that refuses, in the order the server applies them."""
        return next((v for v in (self.tls, self.sender) if not v.accepted), None)


def decide_mail(  # noqa: PLR0913 - the facts MAIL FROM is decided on
    config: GatewayConfig,
    index: ProfileIndex,
    match: ProfileMatch,
    rights: RelayRights,
    sender: str,
    *,
    tls_active: bool,
) -> MailDecision:
    sender_match = match_sender_domain(index, split_address(sender)[1]) if sender else None
    required, why = inbound_tls_required(match, sender_match)
    hosted = frozenset(config.hosted_domains)
    return MailDecision(
        required,
        decide_mail_tls(required, why, tls_active),
        decide_sender(rights.mode, sender, hosted, config.spoof_detection),
        spam_checked(rights.mode, config.spam.check_outbound),
    )
