"""Which recipient validation applies to an address (``recipient_validation``).

Pure: the rule for a recipient's domain, whether a local part is exempt
(``postmaster``, RFC 5321 §4.5.1), how list entries compare, and the line
``policy explain`` prints. The checks themselves (reading the list file,
the SMTP callout) are ``smtpgate.content.recipients``'s.

Validation applies to every recipient at a domain with a rule, whoever the
client is (relay ``full`` and ``restricted-internal`` clients included):
mail for a hosted domain ends up at the same internal server either way.
"""

from __future__ import annotations

from smtpgate.config.schema import GatewayConfig, RecipientValidation
from smtpgate.policy.relay import split_address


def validation_rule(config: GatewayConfig, recipient: str) -> RecipientValidation | None:
    """The rule for ``recipient``'s domain; None: no rule (any recipient)."""
    domain = split_address(recipient)[1]
    for rule in config.recipient_validation:
        if rule.domain == domain:
            return rule
    return None


def exempt(recipient: str) -> bool:
    """``postmaster`` at a hosted domain is always accepted (RFC 5321 §4.5.1)."""
    return split_address(recipient)[0].casefold() == "postmaster"


def entry_key(entry: str) -> str:
    """A list entry (``alice`` or ``alice@example.com``) as compared: the local
    part, case-folded (local parts are matched without regard to case)."""
    return entry.rpartition("@")[0].casefold() if "@" in entry else entry.casefold()


def local_key(recipient: str) -> str:
    return split_address(recipient)[0].casefold()


def describe(config: GatewayConfig, recipient: str) -> str:
    """How RCPT validates ``recipient`` (for ``policy explain``; no I/O)."""
    rule = validation_rule(config, recipient)
    if rule is None or rule.mode == "any":
        return "any recipient accepted (no recipient validation)"
    if exempt(recipient):
        return f"{rule.mode}: postmaster is always accepted (RFC 5321 §4.5.1)"
    if rule.mode == "ldap" and rule.ldap is not None:
        return (
            f"checked in the directory at RCPT (LDAP search under {rule.ldap.base} at "
            f"{rule.ldap.url}; not found: 550 5.1.1, unreachable: 451 4.4.3)"
        )
    if rule.mode == "callout":
        return (
            "checked by callout at RCPT (RCPT probe to the internal server through the "
            "send connector; unknown: 550 5.1.1, unreachable: 451 4.4.3)"
        )
    if local_key(recipient) in {entry_key(e) for e in rule.recipients}:
        return "list: listed in recipients (accepted)"
    if rule.recipients_file is not None:
        return f"list: not in the inline recipients; checked against {rule.recipients_file} at RCPT"
    return "list: not listed (550 5.1.1 at RCPT)"
