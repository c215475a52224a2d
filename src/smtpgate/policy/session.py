"""The order of decisions for one SMTP session, made once.

``SessionPolicy`` holds what a session has established (its profile match,
the profile a user authenticated into) and takes the session's steps in
the server's order, each returning a typed decision with its reason:

1. ``connect``: which profile (IP, then a forward-confirmed host name, then
   the default), whether the client may connect at all (blocked), whether
   STARTTLS and AUTH are offered;
2. ``authenticate``: whether a user with the right password may log in
   (its profile exists, has SMTP AUTH enabled, is not blocked);
3. ``mail``: first the listener's own demands (``security:
   require-starttls``: no MAIL before STARTTLS, RFC 3207 §4; a
   ``client_identity``: no MAIL without an accepted client certificate),
   then inbound TLS required (profile or sender domain), spoofing, the
   spam-check decision (``policy.mail``);
4. ``rcpt``: the relay verdict, ``<Postmaster>`` (RFC 5321 §4.5.1), and the
   send connector (no connector, no 250: a message is never accepted and
   then lost).

The gateway's session handler drives it; ``policy explain`` replays the
very same steps for facts an administrator types, so the two cannot drift.
Pure: no I/O, no clock (reverse DNS and password checks happen outside, and
their results come in as facts).
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

from smtpgate.config.schema import GatewayConfig, Listener, SendConnector
from smtpgate.policy.auth import user_profile
from smtpgate.policy.mail import MailDecision, decide_mail
from smtpgate.policy.profile import Profile, ProfileIndex, ProfileMatch, match_profile
from smtpgate.policy.relay import (
    TRUSTED,
    RelayRights,
    decide_connect,
    decide_relay,
    postmaster_address,
    relay_rights,
)
from smtpgate.policy.routing import route
from smtpgate.policy.tls import MUST_STARTTLS
from smtpgate.policy.verdict import Verdict
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import POSTMASTER

NO_ROUTE = Reply.of(550, "5.7.1", "No send connector for this recipient")
CERTIFICATE_REQUIRED = Reply.of(
    530, "5.7.0", "Must issue STARTTLS and present an accepted client certificate first"
)


@dataclass(frozen=True)
class ListenerFacts:
    """What the session's listener demands before MAIL, as the listener runs
    (a changed ``security`` waits for a restart, so the gateway takes these
    from the running listener, and ``policy explain`` from the configuration)."""

    name: str
    requires_tls: bool  # security: require-starttls
    certificate_required: bool = False  # client_identity other than "any"
    security: str | None = None  # for the reasons, when known

    @classmethod
    def of(cls, listener: Listener) -> ListenerFacts:
        return cls(
            listener.name,
            listener.security == "require-starttls",
            listener.client_identity != "any",
            listener.security,
        )


def decide_listener(
    listener: ListenerFacts | None, *, tls_active: bool, client_certificate: bool
) -> Verdict:
    """The listener's step at MAIL: ``530 5.7.0`` before STARTTLS on a
    ``require-starttls`` listener (RFC 3207 §4), then without an accepted
    client certificate where its ``client_identity`` asks for one."""
    if listener is None:
        return Verdict.accept("no listener given")
    security = listener.security or ("require-starttls" if listener.requires_tls else None)
    label = f"listener {listener.name}" + (f": {security}" if security else "")
    if listener.requires_tls and not tls_active:
        return Verdict.reject(MUST_STARTTLS, f"{label}: MAIL refused without TLS")
    if listener.certificate_required and not client_certificate:
        return Verdict.reject(
            CERTIFICATE_REQUIRED,
            f"{label}: MAIL refused without an accepted client certificate (client_identity)",
        )
    if listener.requires_tls:
        return Verdict.accept(f"{label}: TLS is active")
    return Verdict.accept(f"{label}: TLS not required before MAIL")


@dataclass(frozen=True)
class ConnectDecision:
    match: ProfileMatch
    verdict: Verdict
    starttls_offered: bool  # when the listener offers STARTTLS at all
    auth_offered: bool  # when the connection is (or becomes) encrypted


@dataclass(frozen=True)
class AuthDecision:
    profile: Profile | None  # None: refused (535)
    reason: str


@dataclass(frozen=True)
class MailStep:
    """MAIL FROM as the server decides it: the listener's step, then ``decide_mail``."""

    listener: Verdict
    decision: MailDecision

    @property
    def refusal(self) -> Verdict | None:
        """The first verdict that refuses, in the order the server applies them."""
        return self.listener if not self.listener.accepted else self.decision.refusal

    @property
    def spam_check(self) -> tuple[bool, str]:
        return self.decision.spam_check


@dataclass(frozen=True)
class RcptDecision:
    recipient: str  # as routed: <Postmaster> is the postmaster address
    verdict: Verdict
    connector: SendConnector | None


def known_client(index: ProfileIndex, client_ip: str) -> bool:
    """May this client use the connections ``limits.profile_reserve`` keeps for known
    clients? Only a profile that names the address (IP or CIDR) is known before
    anything is read (a host-name profile needs DNS), and a blocked one never is."""
    match = match_profile(index, client_ip)
    return match.step == "client-ip" and match.profile.relay != "blocked"


def reserve_reason(config: GatewayConfig, index: ProfileIndex, client_ip: str) -> str:
    """What ``policy explain`` says about the reserved connections."""
    reserved = config.limits.reserved_connections
    total = config.limits.max_connections
    kept = f"{reserved} kept for clients a profile names by IP"
    if known_client(index, client_ip):
        return f"may use all {total}, the {kept} included"
    return f"may use {total - reserved} of {total}; {kept}"


class SessionPolicy:
    """One session's decisions, in order (see the module's docstring)."""

    def __init__(
        self,
        config: GatewayConfig,
        index: ProfileIndex,
        auth_enabled: Set[str] | None = None,
        hosted: frozenset[str] | None = None,
        postmaster: str | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.auth_enabled = frozenset(
            auth_enabled
            if auth_enabled is not None
            else (p.name for p in config.connection_profiles if p.smtp_auth.enabled)
        )
        self.hosted = hosted if hosted is not None else frozenset(config.hosted_domains)
        self.roles = frozenset(config.gateway.roles)
        self.postmaster = postmaster or postmaster_address(config)
        self.match = ProfileMatch(index.default, "default")
        self.auth_profile: Profile | None = None
        self.listener: ListenerFacts | None = None  # None: not known, demands nothing

    @property
    def rights(self) -> RelayRights:
        return relay_rights(self.match.profile, self.auth_profile)

    def internal(self) -> bool:
        """Mail from inside: the session's relay rights are trusted (full or
        restricted-internal); sender checks and signing go by this."""
        return self.rights.mode in TRUSTED

    def connect(
        self,
        client_ip: str,
        confirmed_names: Sequence[str] = (),
        listener: ListenerFacts | None = None,
    ) -> ConnectDecision:
        """``listener``: the listener the client connected to (its demands apply at MAIL)."""
        self.listener = listener
        self.match = match_profile(self.index, client_ip, confirmed_names)
        return ConnectDecision(
            self.match,
            decide_connect(self.match.profile),
            self.config.tls.opportunistic or self.match.profile.mandatory_tls,
            bool(self.auth_enabled),
        )

    def authenticate(self, owner: str | None) -> AuthDecision:
        """``owner``: the profile whose credentials matched the user name and
        password, or None when they did not."""
        profile, reason = user_profile(self.index.profiles, owner, self.auth_enabled)
        if profile is not None:
            self.auth_profile = profile
        return AuthDecision(profile, reason)

    def mail(self, sender: str, *, tls_active: bool, client_certificate: bool = False) -> MailStep:
        """``client_certificate``: the client presented one the listener accepted."""
        return MailStep(
            decide_listener(
                self.listener, tls_active=tls_active, client_certificate=client_certificate
            ),
            decide_mail(
                self.config, self.index, self.match, self.rights, sender, tls_active=tls_active
            ),
        )

    def rcpt(self, sender: str, recipient: str) -> RcptDecision:
        verdict = decide_relay(self.rights.mode, recipient, self.hosted)
        routed = self.postmaster if recipient == POSTMASTER else recipient
        if not verdict.accepted:
            return RcptDecision(routed, verdict, None)
        connector = route(self.config.send_connectors, self.roles, sender, routed)
        if connector is None:
            return RcptDecision(routed, Verdict.reject(NO_ROUTE, "no send connector matches"), None)
        return RcptDecision(routed, verdict, connector)
