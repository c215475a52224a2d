"""May this recipient pass? (relay control, decided per recipient at RCPT)

Until connection profiles exist every client is treated as the manual's
relay mode *none*: only recipients in hosted domains are accepted. The
decision is made on the normalised domain (lower case, IDNA), and
sender-specified routing inside a hosted address (``a%b@hosted``,
``b!a@hosted``, ``"a@b"@hosted``) is refused, as Postfix does for untrusted
clients with ``allow_untrusted_routing = no``: a downstream server could
otherwise route it onwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Set

from smtpgate.policy.verdict import Verdict
from smtpgate.proto.replies import Reply


def split_address(address: str) -> tuple[str, str]:
    """``"User@Example.COM"`` → (``"User"``, ``"example.com"``); IDNA-normalised domain."""
    local, _, domain = address.rpartition("@")
    domain = domain.lower()
    if not domain.startswith("["):
        with contextlib.suppress(UnicodeError):  # an invalid IDN matches no hosted domain
            domain = domain.encode("idna").decode("ascii")
    return local, domain


def _has_routing(local: str) -> bool:
    return any(ch in local for ch in "%!@")


def decide_relay(recipient: str, hosted_domains: Set[str]) -> Verdict:
    """Accept recipients in hosted domains; refuse everything else."""
    local, domain = split_address(recipient)
    if domain not in hosted_domains:
        reply = Reply.of(554, "5.7.1", f"<{recipient}>: Relay access denied")
        return Verdict.reject(reply, f"{domain} is not a hosted domain")
    if _has_routing(local):
        reply = Reply.of(554, "5.7.1", f"<{recipient}>: Sender-specified routing is not allowed")
        return Verdict.reject(reply, "local part contains %, ! or @")
    return Verdict.accept(f"{domain} is a hosted domain")
