"""The order of decisions for one SMTP session, made once.

``SessionPolicy`` holds what a session has established (its profile match,
the profile a user authenticated into) and takes the session's steps in
the server's order, each returning a typed decision with its reason:

1. ``connect``: which profile (IP, then a forward-confirmed host name, then
   the default), whether the client may connect at all (blocked), whether
   STARTTLS and AUTH are offered;
2. ``authenticate``: whether a user with the right password may log in
   (its profile exists, has SMTP AUTH enabled, is not blocked);
3. ``mail``: inbound TLS required (profile or sender domain), spoofing, the
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

from smtpgate.config.schema import GatewayConfig, SendConnector
from smtpgate.policy.auth import user_profile
from smtpgate.policy.mail import MailDecision, decide_mail
from smtpgate.policy.profile import Profile, ProfileIndex, ProfileMatch, match_profile
from smtpgate.policy.relay import (
    RelayRights,
    decide_connect,
    decide_relay,
    postmaster_address,
    relay_rights,
)
from smtpgate.policy.routing import route
from smtpgate.policy.verdict import Verdict
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import POSTMASTER

NO_ROUTE = Reply.of(550, "5.7.1", "No send connector for this recipient")


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

    @property
    def rights(self) -> RelayRights:
        return relay_rights(self.match.profile, self.auth_profile)

    def connect(self, client_ip: str, confirmed_names: Sequence[str] = ()) -> ConnectDecision:
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

    def mail(self, sender: str, *, tls_active: bool) -> MailDecision:
        return decide_mail(
            self.config, self.index, self.match, self.rights, sender, tls_active=tls_active
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
