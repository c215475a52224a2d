"""The outbound TLS policy table: what the recipient domain publishes, on top of
the connector and the destination profile (pure).

For one MX host of a direct delivery, in this order (the first that applies
decides what authenticates the server; the connector's and profile's floor,
ciphers and "mandatory" always stay):

1. **DANE** (RFC 7672), when ``outbound_security.dane`` is on and the MX
   RRset and the host's TLSA RRset were validated by the resolver (AD bit):
   usable records (DANE-TA 2, DANE-EE 3) authenticate the server instead of
   the WebPKI, TLS is mandatory; TLSA records that are all unusable still
   make TLS mandatory (§3.1.3); a failed TLSA lookup makes the host unusable
   (§2.2). DANE precedes MTA-STS (RFC 8461 §2).
2. **MTA-STS** (RFC 8461), the per-domain override first
   (``outbound_security.domains``), else the published policy: ``enforce``
   uses only MX hosts matching the policy, with TLS ≥ 1.2 and a WebPKI-valid
   certificate for the MX host name, never plaintext; ``testing`` delivers as
   before and reports what would have failed; ``none`` ignores the policy.
3. Otherwise the connector and the profile alone (``policy/tls.py``).

Smarthost delivery is not subject to DANE or MTA-STS: the domain published
them for its own MX hosts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from smtpgate.config.schema import TLS_ORDER, OutboundSecurity, StsMode, TlsVersion
from smtpgate.policy.tls import OutboundPolicy, TlsaRecord

DaneStatus = Literal["none", "secure", "insecure", "failed"]
USABLE_USAGES = (2, 3)  # DANE-TA, DANE-EE (RFC 7672 §3.1.3: PKIX usages are unusable)


@dataclass(frozen=True)
class StsFact:
    """A domain's MTA-STS policy as fetched (or cached)."""

    mode: StsMode
    mx: tuple[str, ...]
    id: str
    max_age: int
    text: tuple[str, ...] = ()  # the policy's lines, for TLSRPT's policy-string


@dataclass(frozen=True)
class DaneFact:
    """One MX host's TLSA facts: ``secure`` with records, ``insecure`` (not
    validated, or the MX was not), ``none`` (validated: no TLSA), ``failed``."""

    status: DaneStatus
    tlsa: tuple[TlsaRecord, ...] = ()
    name: str = ""  # the TLSA owner name, _PORT._tcp.HOST


@dataclass(frozen=True)
class DomainFacts:
    """Everything the recipient domain publishes about transport security."""

    domain: str
    sts: StsFact | None = None
    sts_error: str | None = None  # why no policy could be used (TLSRPT failure type)
    dane: dict[str, DaneFact] = field(default_factory=dict)  # by MX host
    mx_hosts: tuple[str, ...] = ()  # as looked up (for ``policy explain``)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact, or ``*.`` standing for exactly one left-most label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def sts_mode(settings: OutboundSecurity, facts: DomainFacts) -> tuple[StsMode | None, str]:
    """The MTA-STS mode for the domain and where it came from."""
    for override in settings.domains:
        if override.domain == facts.domain:
            return override.mta_sts, "outbound_security.domains"
    if not settings.mta_sts:
        return None, "outbound_security.mta_sts is off"
    if facts.sts is None:
        return None, facts.sts_error or "no MTA-STS policy published"
    return facts.sts.mode, f"MTA-STS policy id {facts.sts.id}"


def _at_least(minimum: TlsVersion, floor: TlsVersion) -> TlsVersion:
    return floor if TLS_ORDER.index(floor) > TLS_ORDER.index(minimum) else minimum


def secure_policy(
    base: OutboundPolicy, settings: OutboundSecurity, facts: DomainFacts | None, host: str
) -> OutboundPolicy:
    """``base`` (connector and profile) with what ``facts`` demand for ``host``."""
    if facts is None:
        return base
    dane = facts.dane.get(host) if settings.dane else None
    if dane is not None and dane.status == "failed":
        return dataclasses.replace(
            base,
            refusal=f"4.7.5 the TLSA lookup of {dane.name} failed (DANE)",
            published="tlsa",
            reasons=(*base.reasons, f"DANE: the TLSA lookup of {dane.name} failed"),
        )
    if dane is not None and dane.status == "secure" and dane.tlsa:
        usable = tuple(r for r in dane.tlsa if r.usage in USABLE_USAGES)
        if usable:
            why = (
                f"DANE: {len(usable)} DNSSEC-validated TLSA record(s) at {dane.name}"
                " authenticate the server (they take precedence over MTA-STS)"
            )
            return dataclasses.replace(
                base,
                mandatory=True,
                validate=False,
                names=(host,),
                tlsa=usable,
                published="tlsa",
                reasons=(*base.reasons, why),
            )
        why = f"DANE: TLSA records at {dane.name} are all unusable: TLS mandatory, unauthenticated"
        return dataclasses.replace(
            base, mandatory=True, published="tlsa", reasons=(*base.reasons, why)
        )
    mode, source = sts_mode(settings, facts)
    if mode == "enforce":
        sts = facts.sts
        if sts is not None and not any(mx_matches(p, host) for p in sts.mx):
            return dataclasses.replace(
                base,
                refusal=f"4.7.5 {host} is not in the MTA-STS policy of {facts.domain}",
                published="sts",
                reasons=(*base.reasons, f"MTA-STS enforce ({source}): {host} not in the policy"),
            )
        names = tuple(dict.fromkeys((*base.names, host))) if base.validate else (host,)
        why = f"MTA-STS enforce ({source}): TLS 1.2 or later and a valid certificate for {host}"
        return dataclasses.replace(
            base,
            mandatory=True,
            validate=True,
            names=names,
            minimum=_at_least(base.minimum, "TLSv1.2"),
            published="sts",
            reasons=(*base.reasons, why),
        )
    if mode == "testing":
        why = f"MTA-STS testing ({source}): failures are reported, not enforced"
        return dataclasses.replace(
            base, published="sts", testing=True, reasons=(*base.reasons, why)
        )
    if mode == "none" and source == "outbound_security.domains":
        why = f"MTA-STS ignored for {facts.domain} (outbound_security.domains)"
        return dataclasses.replace(base, reasons=(*base.reasons, why))
    return base


def describe(policy: OutboundPolicy) -> str:
    """What ``policy`` requires of one MX host, in a few words."""
    if policy.refusal is not None:
        return f"not used: {policy.refusal}"
    if policy.tlsa:
        return f"TLS, authenticated by DANE ({len(policy.tlsa)} TLSA record(s))"
    if policy.validate:
        return f"TLS from {policy.minimum}, certificate must match {', '.join(policy.names)}"
    if policy.testing:
        return "opportunistic TLS, failures reported (MTA-STS testing)"
    return "mandatory TLS" if policy.mandatory else "opportunistic TLS"
