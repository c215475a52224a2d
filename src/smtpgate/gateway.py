"""The gateway's session handler: connection profiles, TLS, relay, AUTH, hand-off.

``GatewayPolicy`` is the compiled, immutable view of one configuration that
sessions keep for their lifetime; ``GatewayHandler`` asks the pure policy
functions at each step (connect, MAIL, RCPT, AUTH) and hands accepted
messages on. Decisions are logged with their reasons; secrets never are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from pydantic import SecretStr

from smtpgate.config.schema import GatewayConfig, SendConnector
from smtpgate.config.secret import load_key, read_password, read_secret
from smtpgate.dns import DnsResolver, Resolver, confirmed_names
from smtpgate.errors import ConfigError, FieldProblem, QueueError
from smtpgate.inbound.contract import SessionInfo
from smtpgate.inbound.sasl import MECHANISMS
from smtpgate.inbound.server import RefusalLog
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.observe.log import get_logger
from smtpgate.policy.auth import (
    AUTHENTICATED,
    BAD_CREDENTIALS,
    LOCKED_OUT,
    AuthThrottle,
    CredentialIndex,
    user_profile,
)
from smtpgate.policy.mail import decide_mail
from smtpgate.policy.profile import (
    Profile,
    ProfileIndex,
    ProfileMatch,
    match_profile,
)
from smtpgate.policy.relay import (
    RelayRights,
    decide_connect,
    decide_relay,
    postmaster_address,
    relay_rights,
)
from smtpgate.policy.routing import route
from smtpgate.policy.tls import (
    OutboundPolicy,
    destination_tls,
)
from smtpgate.proto import events as ev
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import POSTMASTER
from smtpgate.queue.queue import Queue
from smtpgate.spool import SpooledBody, new_queue_id

log = get_logger("smtpgate.gateway")

NO_ROUTE = Reply.of(550, "5.7.1", "No send connector for this recipient")
QUEUE_FAILED = Reply.of(451, "4.3.0", "Error: queue file write error, try again later")


@dataclass(frozen=True)
class GatewayPolicy:
    """One configuration, compiled for the sessions that start under it."""

    config: GatewayConfig
    hosted: frozenset[str]
    roles: frozenset[str]
    profiles: ProfileIndex
    credentials: CredentialIndex
    auth_enabled: frozenset[str]  # profiles whose SMTP AUTH is enabled
    smarthost_passwords: dict[str, SecretStr]  # connector name → password
    postmaster: str  # where RCPT TO:<Postmaster> goes (RFC 5321 §4.5.1)

    @classmethod
    def build(cls, config: GatewayConfig) -> GatewayPolicy:
        return cls(
            config,
            frozenset(config.hosted_domains),
            frozenset(config.gateway.roles),
            ProfileIndex(config),
            CredentialIndex(_credentials(config)),
            frozenset(p.name for p in config.connection_profiles if p.smtp_auth.enabled),
            _smarthost_passwords(config),
            postmaster_address(config),
        )

    def known_client(self, client_ip: str) -> bool:
        """May this client use the connections reserved for known clients? Only a
        profile that names the address (IP or CIDR) is known before any read (a
        host-name profile needs DNS), and a blocked one never counts."""
        match = match_profile(self.profiles, client_ip)
        return match.step == "client-ip" and match.profile.relay != "blocked"

    def route(
        self, sender: str, recipient: str, exclude: frozenset[str] = frozenset()
    ) -> SendConnector | None:
        return route(self.config.send_connectors, self.roles, sender, recipient, exclude)

    def outbound_tls(self, connector: SendConnector, host: str, domain: str) -> OutboundPolicy:
        """The TLS policy for delivering to ``host`` for ``domain`` through ``connector``."""
        return destination_tls(self.config, self.profiles, connector, host, domain)

    def smarthost_password(self, connector: SendConnector) -> str | None:
        secret = self.smarthost_passwords.get(connector.name)
        return secret.get_secret_value() if secret else None


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


def _smarthost_passwords(config: GatewayConfig) -> dict[str, SecretStr]:
    found: dict[str, SecretStr] = {}
    targets = [(i, c, c.deliver.smarthost) for i, c in enumerate(config.send_connectors)]
    needed = [(i, c, t) for i, c, t in targets if t is not None and t.username is not None]
    if not needed:
        return found
    key = None
    if any(t.password is not None for _, _, t in needed):
        key = load_key(config.gateway.data_dir, create=False)
    for i, connector, target in needed:
        where = f"send_connectors[{i}].deliver.smarthost.password"
        found[connector.name] = read_secret(target.password, target.password_file, key, where)
    return found


@dataclass
class GatewayState:
    """What outlives one configuration: the AUTH throttle and the resolver."""

    throttle: AuthThrottle
    resolver: Resolver
    refusals: RefusalLog = field(default_factory=RefusalLog)  # blocked clients

    @classmethod
    def for_config(cls, config: GatewayConfig) -> GatewayState:
        return cls(AuthThrottle(config.limits), DnsResolver(config.gateway.dns))

    def now(self) -> float:
        return asyncio.get_running_loop().time()


class GatewayHandler:
    """Per-session policy and hand-off for the gateway."""

    def __init__(self, policy: GatewayPolicy, state: GatewayState, queue: Queue) -> None:
        self.policy = policy
        self.state = state
        self.queue = queue
        self.match = ProfileMatch(policy.profiles.default, "default")
        self.auth_profile: Profile | None = None

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
        info.postmaster = self.policy.postmaster
        verdict = decide_connect(self.match.profile)
        if verdict.reply is not None:
            self.state.refusals.refused(
                info.client_ip,
                verdict.reply,
                f"{verdict.reason} ({self.match.reason()})",
                listener=info.listener,
                profile=self.match.profile.name,
            )
            return verdict.reply
        log.info(
            "connect",
            listener=info.listener,
            client=info.client_ip,
            profile=self.match.profile.name,
            why=self.match.reason(),
        )
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
        policy = self.policy
        decision = decide_mail(
            policy.config,
            policy.profiles,
            self.match,
            self._rights(),
            sender,
            tls_active=info.tls is not None,
        )
        refusal = decision.refusal
        if refusal is not None:
            log.info("sender refused", client=info.client_ip, sender=sender, why=refusal.reason)
            return refusal.reply
        info.spam_check = decision.spam_check[0]
        return None

    def _rcpt(self, info: SessionInfo, recipient: str) -> Reply | None:
        verdict = decide_relay(self._rights().mode, recipient, self.policy.hosted)
        if verdict.reply is not None:
            log.info("recipient refused", client=info.client_ip, rcpt=recipient, why=verdict.reason)
            return verdict.reply
        if recipient == POSTMASTER:
            recipient = self.policy.postmaster  # accepted whatever the relay mode
        if self.policy.route(info.sender or "", recipient) is None:
            log.info("recipient refused", client=info.client_ip, rcpt=recipient, why="no route")
            return NO_ROUTE  # never accepted and then lost
        return None

    # -- AUTH ----------------------------------------------------------------

    async def on_auth(self, info: SessionInfo, username: str, password: str) -> Reply:
        throttle, ip = self.state.throttle, info.client_ip
        if throttle.locked(ip, self.state.now()):
            log.info("auth refused", client=ip, user=username, why="locked out")
            return LOCKED_OUT
        owner = self.policy.credentials.verify(username, password)
        profile, why = user_profile(self.policy.profiles.profiles, owner, self.policy.auth_enabled)
        if profile is None:
            delay = throttle.record_failure(ip, self.state.now())
            log.info("auth failed", client=ip, user=username, delay=delay, why=why)
            await asyncio.sleep(delay)
            return LOCKED_OUT if throttle.locked(ip, self.state.now()) else BAD_CREDENTIALS
        throttle.record_success(ip)
        self.auth_profile = profile
        info.profile = profile.name
        log.info("auth ok", client=ip, user=username, profile=profile.name)
        return AUTHENTICATED

    # -- the message ---------------------------------------------------------

    async def on_message(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        try:
            queue_id = await self.queue.ingest(envelope, body)
        except (OSError, QueueError) as exc:
            log.error("queue write failed", error=str(exc))
            return QUEUE_FAILED  # never a 250 for a message that is not durable
        log.info(
            "queued",
            queue_id=queue_id,
            sender=envelope.sender,
            rcpts=len(envelope.recipients),
            size=body.size,
            profile=envelope.profile,
            spam_check=envelope.spam_check,
            client=info.client_ip,
            tls=info.tls,
        )
        return Reply.of(250, "2.0.0", f"Ok: queued as {queue_id}")


def credentials_message(
    policy: GatewayPolicy, profile_name: str, spool_dir: Path
) -> tuple[Envelope, SpooledBody]:
    """The manual's *Send credentials*: a message with a profile's user names and
    passwords for ``gateway.admin_address``, to be queued like any other. It
    contains the passwords in clear, so route it over a connector with TLS.
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
    if policy.route(sender, admin) is None:
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
    log.info("credentials queued", profile=profile_name, to=admin, users=len(users))
    return Envelope(sender=sender, recipients=(Recipient(admin),)), body
