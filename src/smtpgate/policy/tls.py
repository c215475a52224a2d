"""What TLS does policy require, inbound and outbound?

Inbound: a profile's mandatory TLS overrides the global opportunistic
setting. The profile found by client IP or host name decides; a profile
selected by the sender domain at MAIL FROM can add the requirement too (that
is all a sender domain ever does). MAIL without TLS then gets ``530 5.7.0``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

from smtpgate.config.schema import (
    TLS_ORDER,
    GatewayConfig,
    OutboundTls,
    SendConnector,
    TlsSettings,
    TlsVersion,
)
from smtpgate.policy.profile import ProfileIndex, ProfileMatch, client_address
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


_STRENGTH = {"any": 0, "medium": 1, "high": 2}


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 §2.1): usage, selector, matching type, data."""

    usage: int
    selector: int
    matching: int
    data: bytes

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


@dataclass(frozen=True)
class OutboundPolicy:
    """The effective TLS requirement for one delivery, and where each part came from."""

    mandatory: bool
    validate: bool
    names: tuple[str, ...]  # acceptable certificate names when validating
    minimum: TlsVersion
    strength: str
    reasons: tuple[str, ...]
    # Published by the recipient domain (policy/transport.py), direct delivery only:
    tlsa: tuple[TlsaRecord, ...] = ()  # DANE: these authenticate the server, not the WebPKI
    refusal: str | None = None  # this MX host must not be used (e.g. not in the MTA-STS policy)
    published: str = "no-policy-found"  # the TLSRPT policy type: "tlsa", "sts", "no-policy-found"
    testing: bool = False  # MTA-STS testing: failures are reported, mail goes anyway


def outbound_tls_policy(  # noqa: PLR0913, PLR0917 - the facts the decision needs
    connector: SendConnector,
    profile: OutboundTls | None,
    profile_label: str,
    global_tls: TlsSettings,
    host: str,
    recipient_domain: str,
) -> OutboundPolicy:
    """Connector security and the destination profile's outbound TLS: the stricter wins.

    Match criteria: ``hostname`` (the host connected to: smarthost or MX),
    ``mx_hostname`` (the same for direct delivery), ``recipient_domain``, or
    a literal name.
    """
    reasons = [f"connector {connector.name}: security {connector.security}"]
    mandatory = connector.security in ("require-starttls", "implicit-tls")
    minimum: TlsVersion = global_tls.protocols[0]
    strength = global_tls.cipher_strength
    validate = False
    names: tuple[str, ...] = ()
    if profile is not None:
        if profile.mandatory:
            mandatory = True
            reasons.append(f"{profile_label}: mandatory TLS")
        if profile.protocols != "global":
            floor = min(profile.protocols, key=TLS_ORDER.index)
            if TLS_ORDER.index(floor) > TLS_ORDER.index(minimum):
                minimum = floor
                reasons.append(f"{profile_label}: protocols from {floor}")
        if profile.cipher_strength != "global" and (
            _STRENGTH[profile.cipher_strength] > _STRENGTH[strength]
        ):
            strength = profile.cipher_strength
            reasons.append(f"{profile_label}: cipher strength {strength}")
        if profile.validate_certificate:
            validate = True
            words = {"hostname": host, "mx_hostname": host, "recipient_domain": recipient_domain}
            names = tuple(dict.fromkeys(words.get(m, m).lower() for m in profile.match))
            reasons.append(f"{profile_label}: validate the certificate for {', '.join(names)}")
    return OutboundPolicy(mandatory, validate, names, minimum, strength, tuple(reasons))


def outbound_by_profile(config: GatewayConfig) -> dict[str, tuple[OutboundTls, str]]:
    """Each connection profile's ``outbound_tls`` and its label, by profile name
    (compiled once per snapshot; ``policy explain`` builds it on the fly)."""
    return {
        p.name: (p.outbound_tls, f"connection profile {p.name!r}")
        for p in config.connection_profiles
    }


def destination_tls(  # noqa: PLR0913 - the destination and the compiled tables
    config: GatewayConfig,
    index: ProfileIndex,
    connector: SendConnector,
    host: str,
    domain: str,
    *,
    by_profile: Mapping[str, tuple[OutboundTls, str]] | None = None,
) -> OutboundPolicy:
    """The outbound policy for ``host``: its profile by IP, CIDR or host name, else by
    recipient domain (a profile's sender domains name the partner's domain), else the
    default profile."""
    match = None
    with contextlib.suppress(ValueError):
        match = index.by_address(client_address(host))
    profile = (
        match.profile
        if match
        else (index.host_names.get(host.lower()) or index.sender_domains.get(domain))
    )
    table = by_profile if by_profile is not None else outbound_by_profile(config)
    outbound, label = table.get(
        profile.name if profile else "",
        (config.default_profile.outbound_tls, "the default profile"),
    )
    return outbound_tls_policy(connector, outbound, label, config.tls, host, domain)
