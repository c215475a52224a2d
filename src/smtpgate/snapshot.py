"""The running configuration: compiled once per applied revision, held in one place.

A :class:`Snapshot` is everything a running gateway derives from one
configuration, built once and never changed: the profile index, the
credentials and smarthost passwords (decrypted), the outbound TLS policy
per connection profile, the hosted domains and roles, the routing inputs,
the loaded certificates. Compiling fails as a whole (a password that does
not decrypt, a certificate that does not load) with a ``ConfigError``
naming the object, before anything is swapped.

:class:`Current` holds the one current snapshot. Every consumer reads it
through ``current()``: a session reads it once when it starts and keeps it,
the queue manager and the deliverer read it for each run. Applying a
revision is ``compile`` then ``swap``: one reference replaced, nothing
mutated in place, so no reader ever sees half of two revisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import SecretStr

from smtpgate.config.schema import GatewayConfig, OutboundTls, SendConnector
from smtpgate.config.secret import load_key, read_password, read_secret
from smtpgate.policy.auth import CredentialIndex
from smtpgate.policy.profile import ProfileIndex
from smtpgate.policy.relay import postmaster_address, split_address
from smtpgate.policy.routing import route
from smtpgate.policy.session import known_client
from smtpgate.policy.tls import OutboundPolicy, destination_tls, outbound_by_profile
from smtpgate.tls.certificates import Loaded, load_configured

_OUTBOUND_TLS_CACHE = 4096  # destinations remembered per snapshot
_ROUTE_CACHE = 4096  # (sender domain, recipient domain) pairs remembered per snapshot


@dataclass(frozen=True)
class Snapshot:
    """One configuration, compiled (see the module's docstring)."""

    config: GatewayConfig
    revision: int | None
    hosted: frozenset[str]
    roles: frozenset[str]
    profiles: ProfileIndex
    credentials: CredentialIndex
    auth_enabled: frozenset[str]  # profiles whose SMTP AUTH is enabled
    smarthost_passwords: dict[str, SecretStr]  # connector name → password
    postmaster: str  # where RCPT TO:<Postmaster> goes (RFC 5321 §4.5.1)
    outbound: dict[str, tuple[OutboundTls, str]]  # profile name → its outbound_tls, label
    certificates: dict[str, Loaded]
    # (connector name, host, domain) -> (connector, its policy): destination_tls
    # is a pure function of this snapshot and those, asked once per delivery.
    _outbound_tls: dict[tuple[str, str, str], tuple[SendConnector, OutboundPolicy]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # (sender domain, recipient domain, excluded) -> connector: select_connector is a
    # pure function of this snapshot and those, asked at every RCPT and delivery
    _routes: dict[tuple[str, str, frozenset[str]], SendConnector | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def compile(
        cls, config: GatewayConfig, revision: int | None = None, *, certificates: bool = True
    ) -> Snapshot:
        """Compile ``config``; ``certificates=False`` skips loading them (for the
        administrative tools, which only need the policy and the secrets)."""
        return cls(
            config,
            revision,
            frozenset(config.hosted_domains),
            frozenset(config.gateway.roles),
            ProfileIndex(config),
            CredentialIndex(_credentials(config)),
            frozenset(p.name for p in config.connection_profiles if p.smtp_auth.enabled),
            _smarthost_passwords(config),
            postmaster_address(config),
            outbound_by_profile(config),
            load_configured(config) if certificates else {},
        )

    def known_client(self, client_ip: str) -> bool:
        """May this client use the connections reserved for known clients?"""
        return known_client(self.profiles, client_ip)

    def route(
        self, sender: str, recipient: str, exclude: frozenset[str] = frozenset()
    ) -> SendConnector | None:
        key = (split_address(sender)[1] if sender else "", split_address(recipient)[1], exclude)
        try:
            return self._routes[key]
        except KeyError:
            pass
        found = route(self.config.send_connectors, self.roles, sender, recipient, exclude)
        if len(self._routes) >= _ROUTE_CACHE:
            self._routes.clear()
        self._routes[key] = found
        return found

    def outbound_tls(self, connector: SendConnector, host: str, domain: str) -> OutboundPolicy:
        """The TLS policy for delivering to ``host`` for ``domain`` through ``connector``."""
        key = (connector.name, host, domain)
        cached = self._outbound_tls.get(key)
        if cached is not None and cached[0] is connector:  # the same object, not a namesake
            return cached[1]
        policy = destination_tls(
            self.config, self.profiles, connector, host, domain, by_profile=self.outbound
        )
        if len(self._outbound_tls) >= _OUTBOUND_TLS_CACHE:
            self._outbound_tls.clear()
        self._outbound_tls[key] = (connector, policy)
        return policy

    def smarthost_password(self, connector: SendConnector) -> str | None:
        secret = self.smarthost_passwords.get(connector.name)
        return secret.get_secret_value() if secret else None

    def client_certificate(self, connector: SendConnector) -> Loaded | None:
        """The identity ``connector`` presents to the next hop, if it names one."""
        return self.certificates.get(connector.client_certificate or "")


class Current:
    """The one current snapshot; ``swap`` replaces it whole."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def __call__(self) -> Snapshot:
        return self._snapshot

    def swap(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot


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
