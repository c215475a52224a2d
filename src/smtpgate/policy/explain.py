"""``policy explain``: every decision for a hypothetical client, with reasons.

It replays the server's own decision sequence (``policy.session.SessionPolicy``,
which the session handler drives), so what it prints is what the gateway
would do: which profile matched and why,
whether the client may connect, the TLS requirement (the listener's own, when
a listener is named, and the profiles'), the relay rights (after AUTH too),
the sender check, and per recipient the relay verdict and the send connector.
For direct delivery, the outbound TLS table (``policy.transport``) per MX host:
with ``--lookup`` the domain's DANE and MTA-STS facts are looked up first
(``Facts.published``); without, the configured overrides alone apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpgate.config.schema import GatewayConfig, Listener
from smtpgate.policy.profile import ProfileIndex, ProfileMatch
from smtpgate.policy.recipients import describe as describe_validation
from smtpgate.policy.relay import (
    RelayRights,
    split_address,
)
from smtpgate.policy.session import ListenerFacts, SessionPolicy, reserve_reason
from smtpgate.policy.tls import (
    OutboundPolicy,
    destination_tls,
)
from smtpgate.policy.transport import DomainFacts, secure_policy
from smtpgate.policy.verdict import Verdict


@dataclass(frozen=True)
class Facts:
    client_ip: str
    confirmed_names: Sequence[str] = ()
    helo: str | None = None
    sender: str | None = None
    recipients: Sequence[str] = ()
    tls: bool = False
    auth_user: str | None = None
    client_certificate: str | None = None  # as the listener verified it
    listener: str | None = None  # a configured listener's name: its security applies
    published: Mapping[str, DomainFacts] = field(default_factory=dict)  # by recipient domain


class UnknownListenerError(ValueError):
    """``Facts.listener`` names no configured listener (the message lists them)."""


def find_listener(config: GatewayConfig, name: str) -> Listener:
    for listener in config.listeners:
        if listener.name == name:
            return listener
    configured = ", ".join(x.name for x in config.listeners) or "none"
    raise UnknownListenerError(f"no listener named {name!r} (configured: {configured})")


@dataclass(frozen=True)
class RecipientDecision:
    recipient: str
    verdict: Verdict
    connector: str | None
    connector_reason: str
    outbound_tls: OutboundPolicy | None = None
    validation: str | None = None  # recipient validation at RCPT (policy.recipients)
    mx_tls: tuple[tuple[str, OutboundPolicy], ...] = ()  # direct delivery: per MX host


@dataclass(frozen=True)
class Explanation:
    profile: ProfileMatch
    connect: Verdict
    rights: RelayRights
    auth: str | None
    tls_required: bool
    tls: Verdict | None
    sender: Verdict | None
    spam_check: tuple[bool, str]
    recipients: list[RecipientDecision] = field(default_factory=list)
    client_certificate: str | None = None
    connections: str = ""  # the share of connections this client may use
    listener: ListenerFacts | None = None
    listener_step: Verdict | None = None  # at MAIL, before the profiles' TLS requirement
    spam_scanner: str = ""  # who scans when spam_check says yes (spam.rspamd)
    sender_auth: str = ""  # SPF/DKIM/DMARC verified and enforced, or DKIM-signed (sender_auth)
    virus_check: str = ""  # clamd scans every message (virus.clamd), or none is configured

    def as_dict(self) -> dict[str, Any]:
        def verdict(v: Verdict | None) -> dict[str, Any] | None:
            if v is None:
                return None
            return {
                "accepted": v.accepted,
                "reply": v.reply.text() if v.reply else None,
                "reason": v.reason,
            }

        return {
            "profile": {
                "name": self.profile.profile.name,
                "default": self.profile.profile.is_default,
                "matched_by": self.profile.step,
                "entry": self.profile.entry,
                "reason": self.profile.reason(),
            },
            "connect": verdict(self.connect),
            "connections": self.connections,
            "auth": self.auth,
            "client_certificate": self.client_certificate,
            "relay": {"mode": self.rights.mode, "reason": self.rights.reason},
            "listener": _listener(self.listener, self.listener_step),
            "inbound_tls": {"required": self.tls_required, "verdict": verdict(self.tls)},
            "sender": verdict(self.sender),
            "spam_check": {
                "checked": self.spam_check[0],
                "reason": self.spam_check[1],
                "scanner": self.spam_scanner,
            },
            "sender_auth": self.sender_auth,
            "virus_check": self.virus_check,
            "recipients": [
                {
                    "recipient": d.recipient,
                    **(verdict(d.verdict) or {}),
                    "connector": d.connector,
                    "connector_reason": d.connector_reason,
                    "outbound_tls": _outbound(d.outbound_tls),
                    "validation": d.validation,
                    "mx_tls": [{"host": h, **(_outbound(p) or {})} for h, p in d.mx_tls],
                }
                for d in self.recipients
            ],
        }

    def as_text(self) -> str:
        return explanation_text(self.as_dict())


def _show(verdict: dict[str, Any]) -> str:
    if verdict["accepted"]:
        return f"accept ({verdict['reason']})"
    return f"refuse {verdict['reply'] or ''} ({verdict['reason']})"


def explanation_text(result: dict[str, Any]) -> str:
    """The text ``policy explain`` prints, from :meth:`Explanation.as_dict` (which
    is also what the API returns, so the CLI prints the same either way)."""
    lines = [f"profile:      {result['profile']['reason']}"]
    lines.append(f"connect:      {_show(result['connect'])}")
    if result.get("connections"):
        lines.append(f"connections:  {result['connections']}")
    if result["client_certificate"]:
        lines.append(f"client cert:  {result['client_certificate']} (verified by the listener)")
    if result["auth"]:
        lines.append(f"auth:         {result['auth']}")
    lines.append(f"relay:        {result['relay']['reason']}")
    listener = result.get("listener")
    if listener is not None:
        refused = "" if listener["accepted"] else f" ({listener['reply']})"
        lines.append(f"listener:     {listener['reason']}{refused}")
    if result["inbound_tls"]["verdict"] is not None:
        lines.append(f"inbound TLS:  {_show(result['inbound_tls']['verdict'])}")
    if result["sender"] is not None:
        lines.append(f"sender:       {_show(result['sender'])}")
    spam = result["spam_check"]
    lines.append(f"spam check:   {'yes' if spam['checked'] else 'no'} ({spam['reason']})")
    if spam["checked"] and spam.get("scanner"):
        lines.append(f"  scanner:    {spam['scanner']}")
    if result.get("sender_auth"):
        lines.append(f"sender auth:  {result['sender_auth']}")
    if result.get("virus_check"):
        lines.append(f"virus check:  {result['virus_check']}")
    for d in result["recipients"]:
        lines.append(f"recipient {d['recipient']}: {_show(d)}")
        lines.append(f"  connector:  {d['connector'] or '-'} ({d['connector_reason']})")
        if d.get("validation"):
            lines.append(f"  validation: {d['validation']}")
        tls = d["outbound_tls"]
        if tls is not None:
            names = ", ".join(tls["names"])
            lines.append(
                f"  outbound TLS: {'mandatory' if tls['mandatory'] else 'opportunistic'}"
                f", from {tls['minimum']}, {tls['cipher_strength']} ciphers"
                + (f", certificate must match {names}" if tls["validate"] else "")
                + f" ({'; '.join(tls['reasons'])})"
            )
        lines += _mx_lines(d)
    return "\n".join(lines)


def _listener(facts: ListenerFacts | None, step: Verdict | None) -> dict[str, Any] | None:
    if facts is None or step is None:
        return None
    return {
        "name": facts.name,
        "security": facts.security,
        "requires_tls": facts.requires_tls,
        "client_certificate_required": facts.certificate_required,
        "accepted": step.accepted,
        "reply": step.reply.text() if step.reply else None,
        "reason": step.reason,
    }


def _outbound(tls: OutboundPolicy | None) -> dict[str, Any] | None:
    if tls is None:
        return None
    return {
        "mandatory": tls.mandatory,
        "validate": tls.validate,
        "names": list(tls.names),
        "minimum": tls.minimum,
        "cipher_strength": tls.strength,
        "reasons": list(tls.reasons),
        "tlsa": [r.text() for r in tls.tlsa],
        "refusal": tls.refusal,
        "published": tls.published,
        "testing": tls.testing,
    }


def _mx_lines(decision: dict[str, Any]) -> list[str]:
    return [
        f"  MX {mx['host']}: {_requirement(mx)} ({'; '.join(mx['reasons'])})"
        for mx in decision.get("mx_tls", [])
    ]


def _requirement(tls: dict[str, Any]) -> str:
    """One line: what the table requires of one MX host."""
    if tls.get("refusal"):
        return f"not used: {tls['refusal']}"
    if tls.get("tlsa"):
        return f"TLS, authenticated by DANE ({len(tls['tlsa'])} TLSA record(s))"
    if tls["validate"]:
        return f"TLS from {tls['minimum']}, certificate must match {', '.join(tls['names'])}"
    if tls.get("testing"):
        return "opportunistic TLS, failures reported (MTA-STS testing)"
    return "mandatory TLS" if tls["mandatory"] else "opportunistic TLS"


def explain(
    config: GatewayConfig, index: ProfileIndex, user_profiles: Mapping[str, str], facts: Facts
) -> Explanation:
    """Every decision for ``facts``, by replaying the server's own steps
    (``SessionPolicy``); ``user_profiles`` maps user names to profile names.
    Raises :class:`UnknownListenerError` when ``facts.listener`` is not configured."""
    listener = (
        ListenerFacts.of(find_listener(config, facts.listener))
        if facts.listener is not None
        else None
    )
    session = SessionPolicy(config, index)
    connect = session.connect(facts.client_ip, facts.confirmed_names, listener)
    auth_note = None
    if facts.auth_user is not None:
        auth = session.authenticate(user_profiles.get(facts.auth_user))
        auth_note = f"user {facts.auth_user!r}: " + (
            auth.reason if auth.profile else f"authentication would fail ({auth.reason})"
        )
    step = session.mail(
        facts.sender or "",
        tls_active=facts.tls,
        client_certificate=facts.client_certificate is not None,
    )
    mail, given = step.decision, facts.sender is not None
    result = Explanation(
        session.match,
        connect.verdict,
        session.rights,
        auth_note,
        mail.tls_required,
        mail.tls if given else None,
        mail.sender if given else None,
        mail.spam_check,
        client_certificate=facts.client_certificate,
        connections=reserve_reason(config, index, facts.client_ip),
        listener=listener,
        listener_step=step.listener if listener is not None else None,
        spam_scanner=_spam_scanner(config),
        sender_auth=_sender_auth(config, session, facts.sender or ""),
        virus_check=_virus_check(config),
    )
    for recipient in facts.recipients:
        decision = _recipient(
            session, connect.verdict, facts.sender or "", recipient, facts.published
        )
        result.recipients.append(decision)
    return result


def _virus_check(config: GatewayConfig) -> str:
    """Whether clamd scans the message (every one, both directions) and its decisions."""
    virus = config.virus
    if not virus.clamd:
        return "no (virus.clamd not set)"
    down = "accept unchecked" if virus.fail == "open" else "451"
    return (
        f"yes, clamd at {virus.clamd} (infected: {virus.infected}; over "
        f"{virus.max_size} octets or its stream limit: {virus.over_limit}; "
        f"fail {virus.fail}: {down} when it is down)"
    )


def _spam_scanner(config: GatewayConfig) -> str:
    """Who scans a message the profile wants spam-checked, and when it cannot."""
    rspamd = config.spam.rspamd
    if rspamd is None:
        return "none configured (spam.rspamd): the message is not scanned"
    down = "accept unchecked" if rspamd.fail == "open" else "451"
    held = (
        f", quarantine from score {rspamd.quarantine_score:g}"
        if rspamd.quarantine_score is not None
        else ""
    )
    return f"rspamd at {rspamd.url} (fail {rspamd.fail}: {down} when it is down{held})"


def _sender_auth(config: GatewayConfig, session: SessionPolicy, sender: str) -> str:
    """What sender authentication does to this client's mail (content.senderauth,
    content.dkimsign): verify and enforce DMARC from outside, sign from inside."""
    settings = config.sender_auth
    if session.internal():
        domain = sender.rpartition("@")[2].lower()
        signing = [e for e in settings.dkim_signing if e.domain == domain]
        if signing:
            return (
                f"from inside: not verified; DKIM-signed as d={domain} s={signing[0].selector}"
                " (or as its From domain's entry)"
            )
        return "from inside: not verified; DKIM-signed only if its From domain has a key"
    if not settings.verify:
        return "not verified (sender_auth.verify is off)"
    name = session.match.profile.name
    profiles = [p for p in config.connection_profiles if p.name == name]
    mode = profiles[0].dmarc_policy if profiles else config.default_profile.dmarc_policy
    action = (
        "p=reject refused (550 5.7.1), p=quarantine held"
        if mode == "enforce"
        else "failures only reported"
    )
    return f"SPF, DKIM, DMARC verified; DMARC {mode} (profile {name}: {action})"


def _recipient(
    session: SessionPolicy,
    connect: Verdict,
    sender: str,
    recipient: str,
    published: Mapping[str, DomainFacts],
) -> RecipientDecision:
    """One RCPT replayed, with the send connector and its outbound TLS policy."""
    if not connect.accepted:  # the server never gets as far as RCPT
        return RecipientDecision(recipient, connect, None, "the connection is refused")
    decision = session.rcpt(sender, recipient)
    connector = decision.connector
    if connector is None:
        return RecipientDecision(recipient, decision.verdict, None, decision.verdict.reason)
    domain = split_address(decision.recipient)[1]
    smarthost = connector.deliver.smarthost
    host = smarthost.host if smarthost else f"MX of {domain}"
    mx_tls: tuple[tuple[str, OutboundPolicy], ...] = ()
    if smarthost is None:
        facts = published.get(domain, DomainFacts(domain))
        settings = session.config.outbound_security
        mx_tls = tuple(
            (
                mx,
                secure_policy(
                    destination_tls(session.config, session.index, connector, mx, domain),
                    settings,
                    facts,
                    mx,
                ),
            )
            for mx in facts.mx_hosts or (host,)
        )
    return RecipientDecision(
        recipient,
        decision.verdict,
        connector.name,
        f"cheapest matching connector (cost {connector.cost})"
        + (f", delivered to {decision.recipient}" if decision.recipient != recipient else ""),
        destination_tls(session.config, session.index, connector, host, domain),
        describe_validation(session.config, decision.recipient),
        mx_tls,
    )
