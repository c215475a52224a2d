"""May this client send, and may this recipient pass? (relay control, spoofing)

The five relay modes of a connection profile, decided per recipient at RCPT
on the normalised domain (:func:`smtpgate.model.domain.normalise_domain`:
lower case, A-labels, IDNA 2008; a source route is already gone):

=====================  ==========================  ===================
mode                   recipients accepted          spam-checked
=====================  ==========================  ===================
none                   hosted domains               yes
full                   any                          only if check_outbound
restricted-external    hosted domains               yes
restricted-internal    hosted domains               only if check_outbound
blocked                none: 554 5.7.1 at connect   -
=====================  ==========================  ===================

``RCPT TO:<Postmaster>`` without a domain (the core passes it as
``postmaster``) is accepted in every mode but blocked (RFC 5321 §4.5.1); the
gateway delivers it to ``gateway.admin_address`` (or postmaster@ the first
hosted domain).

Untrusted modes (none, restricted-external, and the default profile unless
configured otherwise) may not use sender-specified routing inside a hosted
address (``a%b@hosted``, ``b!a@hosted``, ``"a@b"@hosted``): a downstream
server could route it onwards, the way Postfix refuses it for untrusted
clients (``allow_untrusted_routing = no``). IP-literal recipients are never
hosted.

Spoof detection: a client whose mode is untrusted may not use a sender
address in a hosted domain; with spoof detection off, mail within hosted
domains is not blocked.

An authenticated session relays as the more permissive of its connection
profile and the profile that owns its credentials (as Postfix's
``permit_mynetworks, permit_sasl_authenticated``): full > restricted-internal
> restricted-external > none.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from functools import lru_cache

from smtpgate.config.schema import GatewayConfig, RelayMode
from smtpgate.model.domain import DomainError, normalise_domain
from smtpgate.policy.profile import Profile
from smtpgate.policy.verdict import Verdict
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import POSTMASTER

TRUSTED: frozenset[RelayMode] = frozenset({"full", "restricted-internal"})
_RANK: dict[RelayMode, int] = {
    "blocked": -1,
    "none": 0,
    "restricted-external": 1,
    "restricted-internal": 2,
    "full": 3,
}
BLOCKED = Reply.of(554, "5.7.1", "Access denied")


def split_address(address: str) -> tuple[str, str]:
    """``"User@Bücher.EXAMPLE"`` → (``"User"``, ``"xn--bcher-kva.example"``).

    The domain is in the normal form hosted domains are kept in; an address
    literal is lower-cased. A domain with no normal form comes back as
    written, and so equals no hosted domain: those are all in normal form,
    and a string already in normal form would have been accepted.
    """
    local, _, domain = address.rpartition("@")
    if domain.startswith("["):
        return local, domain.lower()
    return local, _normal_domain(domain)


@lru_cache(maxsize=4096)
def _normal_domain(domain: str) -> str:
    """:func:`normalise_domain`, or ``domain`` as written when it has no normal
    form; remembered, since one message asks for the same domains again and
    again (relay decision, routing, validation, delivery)."""
    try:
        return normalise_domain(domain)
    except DomainError:
        return domain


@dataclass(frozen=True, slots=True)
class RelayRights:
    """The relay mode in force for a session, and where it comes from."""

    mode: RelayMode
    reason: str


def postmaster_address(config: GatewayConfig) -> str:
    """Where ``RCPT TO:<Postmaster>`` goes: ``gateway.admin_address``, else
    postmaster at the first hosted domain, else at the gateway's own name."""
    if config.gateway.admin_address:
        return config.gateway.admin_address
    domain = config.hosted_domains[0] if config.hosted_domains else config.gateway.hostname
    return f"postmaster@{domain}"


def relay_rights(connection: Profile, auth_profile: Profile | None = None) -> RelayRights:
    """The mode in force: the connection's, or the more permissive after AUTH."""
    if auth_profile is None or _RANK[auth_profile.relay] <= _RANK[connection.relay]:
        return RelayRights(connection.relay, f"relay {connection.relay} from {connection.label}")
    return RelayRights(
        auth_profile.relay,
        f"relay {auth_profile.relay} from {auth_profile.label} (authenticated user)",
    )


def decide_connect(profile: Profile) -> Verdict:
    if profile.relay == "blocked":
        return Verdict.reject(BLOCKED, f"{profile.label} is blocked")
    return Verdict.accept(f"{profile.label} may connect")


def decide_relay(mode: RelayMode, recipient: str, hosted_domains: Set[str]) -> Verdict:
    """May ``recipient`` pass for a session whose relay mode is ``mode``?"""
    local, domain = split_address(recipient)
    if mode == "blocked":
        return Verdict.reject(BLOCKED, "the client is blocked")
    if recipient == POSTMASTER:
        return Verdict.accept("<postmaster> without a domain is always accepted (RFC 5321 §4.5.1)")
    if mode == "full":
        return Verdict.accept("relay full: any recipient")
    if domain not in hosted_domains:
        reply = Reply.of(554, "5.7.1", f"<{recipient}>: Relay access denied")
        return Verdict.reject(reply, f"relay {mode}: {domain} is not a hosted domain")
    if mode not in TRUSTED and any(ch in local for ch in "%!@"):
        reply = Reply.of(554, "5.7.1", f"<{recipient}>: Sender-specified routing is not allowed")
        return Verdict.reject(reply, f"relay {mode}: the local part routes onwards (%, ! or @)")
    return Verdict.accept(f"relay {mode}: {domain} is a hosted domain")


def spam_checked(mode: RelayMode, check_outbound: bool) -> tuple[bool, str]:
    """Whether mail from a session with ``mode`` goes through the spam scanner."""
    if mode in TRUSTED:
        if check_outbound:
            return True, f"relay {mode}, and spam.check_outbound is on"
        return False, f"relay {mode}: internal mail is not spam-checked"
    return True, f"relay {mode}: mail from outside is spam-checked"


def decide_sender(
    mode: RelayMode, sender: str, hosted_domains: Set[str], spoof_detection: bool
) -> Verdict:
    """Spoof detection at MAIL FROM."""
    if not sender or not spoof_detection:
        return Verdict.accept("spoof detection does not apply")
    domain = split_address(sender)[1]
    if domain in hosted_domains and mode not in TRUSTED:
        reply = Reply.of(
            553,
            "5.7.1",
            f"<{sender}>: Sender address rejected: not allowed from your address (hosted domain)",
        )
        return Verdict.reject(
            reply, f"spoof detection: {domain} is hosted, relay {mode} is not trusted to send as it"
        )
    return Verdict.accept("sender allowed")
