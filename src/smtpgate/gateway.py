"""The gateway's session handler: connection profiles, TLS, relay, AUTH, hand-off.

``GatewayPolicy`` is the compiled, immutable view of one configuration that
sessions keep for their lifetime; ``GatewayHandler`` asks the pure policy
functions at each step (connect, MAIL, RCPT, AUTH) and hands accepted
messages on. Decisions are logged with their reasons; secrets never are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from pydantic import SecretStr

from smtpgate.config.schema import GatewayConfig, SendConnector
from smtpgate.config.secret import load_key, read_password
from smtpgate.delivery.relay import HandOff, Outcome, relay_message
from smtpgate.dns import DnsResolver, Resolver, confirmed_names
from smtpgate.errors import ConfigError, FieldProblem
from smtpgate.inbound.sasl import MECHANISMS
from smtpgate.inbound.session import SessionInfo
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.observe.log import get_logger
from smtpgate.policy.auth import (
    AUTHENTICATED,
    BAD_CREDENTIALS,
    LOCKED_OUT,
    AuthThrottle,
    CredentialIndex,
)
from smtpgate.policy.profile import (
    Profile,
    ProfileIndex,
    ProfileMatch,
    match_profile,
    match_sender_domain,
)
from smtpgate.policy.relay import (
    RelayRights,
    decide_connect,
    decide_relay,
    decide_sender,
    relay_rights,
    spam_checked,
    split_address,
)
from smtpgate.policy.routing import select_connector
from smtpgate.policy.tls import decide_mail_tls, inbound_tls_required
from smtpgate.proto import events as ev
from smtpgate.proto.replies import Reply
from smtpgate.spool import SpooledBody, new_queue_id

log = get_logger("smtpgate.gateway")

NO_ROUTE = Reply.of(550, "5.7.1", "No send connector for this recipient")
SPLIT_ROUTE = Reply.of(452, "4.5.3", "Send this recipient in a separate transaction")


@dataclass(frozen=True)
class GatewayPolicy:
    """One configuration, compiled for the sessions that start under it."""

    config: GatewayConfig
    hosted: frozenset[str]
    roles: frozenset[str]
    profiles: ProfileIndex
    credentials: CredentialIndex
    auth_enabled: frozenset[str]  # profiles whose SMTP AUTH is enabled

    @classmethod
    def build(cls, config: GatewayConfig) -> GatewayPolicy:
        return cls(
            config,
            frozenset(config.hosted_domains),
            frozenset(config.gateway.roles),
            ProfileIndex(config),
            CredentialIndex(_credentials(config)),
            frozenset(p.name for p in config.connection_profiles if p.smtp_auth.enabled),
        )

    def route(self, sender: str, recipient: str) -> SendConnector | None:
        sender_domain = split_address(sender)[1] if sender else ""
        recipient_domain = split_address(recipient)[1]
        return select_connector(
            self.config.send_connectors, self.roles, sender_domain, recipient_domain
        )


def _credentials(config: GatewayConfig) -> dict[str, tuple[str, SecretStr]]:
    """Every user of every profile with its clear password (kept in SecretStr)."""
    encrypted = any(
        c.password is not None for p in config.connection_profiles for c in p.smtp_auth.credentials
    )
    key = load_key(config.gateway.data_dir, create=False) if encrypted else None
    users: dict[str, tuple[str, SecretStr]] = {}
    for i, profile in enumerate(config.connection_profiles):
        for j, credential in enumerate(profile.smtp_auth.credentials):
            where = f"connection_profiles[{i}].smtp_auth.credentials[{j}]"
            users[credential.username] = (profile.name, read_password(credential, key, where))
    return users


@dataclass
class GatewayState:
    """What outlives one configuration: the AUTH throttle and the resolver."""

    throttle: AuthThrottle
    resolver: Resolver

    @classmethod
    def for_config(cls, config: GatewayConfig) -> GatewayState:
        return cls(AuthThrottle(config.limits), DnsResolver(config.gateway.dns))

    def now(self) -> float:
        return asyncio.get_running_loop().time()


class GatewayHandler:
    """Per-session policy and hand-off for the gateway."""

    def __init__(self, policy: GatewayPolicy, state: GatewayState) -> None:
        self.policy = policy
        self.state = state
        self.match = ProfileMatch(policy.profiles.default, "default")
        self.auth_profile: Profile | None = None
        self.connector: SendConnector | None = None

    # -- connect -------------------------------------------------------------

    async def on_connect(self, info: SessionInfo) -> Reply | None:
        profiles = self.policy.profiles
        names = (
            await confirmed_names(self.state.resolver, info.client_ip)
            if (profiles.uses_host_names)
            else []
        )
        self.match = match_profile(profiles, info.client_ip, names)
        info.profile = self.match.profile.name
        verdict = decide_connect(self.match.profile)
        log.info(
            "connect",
            listener=info.listener,
            client=info.client_ip,
            profile=self.match.profile.name,
            why=self.match.reason(),
        )
        if verdict.reply is not None:
            return verdict.reply
        config = self.policy.config
        info.offer_starttls = info.offer_starttls and (
            config.tls.opportunistic or self.match.profile.mandatory_tls
        )
        info.auth_mechanisms = MECHANISMS if self.policy.auth_enabled else ()
        return None

    def _rights(self) -> RelayRights:
        return relay_rights(self.match.profile, self.auth_profile)

    # -- commands ------------------------------------------------------------

    def on_command(self, info: SessionInfo, event: ev.Event) -> Reply | None:
        if isinstance(event, ev.MailFrom):
            return self._mail(info, event.sender)
        if isinstance(event, ev.RcptTo):
            return self._rcpt(info, event.recipient)
        return None

    def _mail(self, info: SessionInfo, sender: str) -> Reply | None:
        self.connector = None
        policy = self.policy
        sender_domain = split_address(sender)[1] if sender else ""
        sender_match = match_sender_domain(policy.profiles, sender_domain) if sender else None
        required, why = inbound_tls_required(self.match, sender_match)
        rights = self._rights()
        for verdict in (
            decide_mail_tls(required, why, info.tls is not None),
            decide_sender(rights.mode, sender, policy.hosted, policy.config.spoof_detection),
        ):
            if verdict.reply is not None:
                log.info("sender refused", client=info.client_ip, sender=sender, why=verdict.reason)
                return verdict.reply
        info.spam_check = spam_checked(rights.mode, policy.config.spam.check_outbound)[0]
        return None

    def _rcpt(self, info: SessionInfo, recipient: str) -> Reply | None:
        verdict = decide_relay(self._rights().mode, recipient, self.policy.hosted)
        if verdict.reply is not None:
            log.info("recipient refused", client=info.client_ip, rcpt=recipient, why=verdict.reason)
            return verdict.reply
        connector = self.policy.route(info.sender or "", recipient)
        if connector is None:
            return NO_ROUTE
        if self.connector is not None and connector.name != self.connector.name:
            return SPLIT_ROUTE  # one hand-off per message until the queue routes per recipient
        self.connector = connector
        return None

    # -- AUTH ----------------------------------------------------------------

    async def on_auth(self, info: SessionInfo, username: str, password: str) -> Reply:
        throttle, ip = self.state.throttle, info.client_ip
        if throttle.locked(ip, self.state.now()):
            log.info("auth refused", client=ip, user=username, why="locked out")
            return LOCKED_OUT
        owner = self.policy.credentials.verify(username, password)
        profile = self.policy.profiles.profiles.get(owner) if owner else None
        usable = profile is not None and owner in self.policy.auth_enabled
        if not usable or profile is None or profile.relay == "blocked":
            delay = throttle.record_failure(ip, self.state.now())
            log.info("auth failed", client=ip, user=username, delay=delay)
            await asyncio.sleep(delay)
            return LOCKED_OUT if throttle.locked(ip, self.state.now()) else BAD_CREDENTIALS
        throttle.record_success(ip)
        self.auth_profile = profile
        info.profile = profile.name
        log.info("auth ok", client=ip, user=username, profile=profile.name)
        return AUTHENTICATED

    # -- the message ---------------------------------------------------------

    async def on_message(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        connector, self.connector = self.connector, None
        if connector is None:
            return NO_ROUTE
        config = self.policy.config
        job = HandOff(
            connector, envelope, body, config.gateway.hostname, config.timeouts, body.queue_id
        )
        outcome = await relay_message(job)
        log.info(
            "message",
            queue_id=body.queue_id,
            sender=envelope.sender,
            rcpts=len(envelope.recipients),
            size=body.size,
            profile=envelope.profile,
            spam_check=envelope.spam_check,
            connector=connector.name,
            tls=outcome.tls,
            result=outcome.reply.text(),
            detail=outcome.detail,
        )
        return outcome.reply


async def send_credentials(policy: GatewayPolicy, profile_name: str, spool_dir: Path) -> Outcome:
    """Mail a profile's user names and passwords to ``gateway.admin_address``.

    The manual's *Send credentials*: the message goes through the gateway's
    own routing and delivery like any other. It contains the passwords in
    clear, so it should only travel over connectors with TLS.
    """
    config = policy.config
    admin = config.gateway.admin_address
    if not admin:
        raise ConfigError([FieldProblem("gateway.admin_address", "needed to send credentials")])
    if profile_name not in policy.profiles.profiles:
        raise ConfigError([FieldProblem("connection_profiles", f"no profile {profile_name!r}")])
    users = sorted(
        (user, secret.get_secret_value())
        for user, (owner, secret) in policy.credentials.users.items()
        if owner == profile_name
    )
    sender = f"postmaster@{config.gateway.hostname}"
    connector = policy.route(sender, admin)
    if connector is None:
        raise ConfigError([FieldProblem("send_connectors", f"no connector routes to {admin}")])
    message = EmailMessage()
    message["From"] = sender
    message["To"] = admin
    message["Subject"] = f"SMTP AUTH credentials of connection profile {profile_name}"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain=config.gateway.hostname)
    lines = [
        f"Connection profile {profile_name} on {config.gateway.hostname} "
        f"({config.gateway.node}) has these SMTP AUTH credentials:",
        "",
    ]
    lines += [f"  user name: {user}\n  password:  {password}\n" for user, password in users]
    message.set_content("\n".join(lines) if users else "This profile has no credentials.\n")
    body = SpooledBody(spool_dir, new_queue_id())
    body.write(message.as_bytes(policy=message.policy.clone(linesep="\r\n")))
    body.finish()
    envelope = Envelope(sender=sender, recipients=(Recipient(admin),))
    job = HandOff(
        connector, envelope, body, config.gateway.hostname, config.timeouts, body.queue_id
    )
    try:
        outcome = await relay_message(job)
    finally:
        body.discard()
    log.info(
        "credentials sent",
        profile=profile_name,
        to=admin,
        users=len(users),
        result=outcome.reply.text(),
    )
    return outcome
