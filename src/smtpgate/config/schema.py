"""The configuration schema: one pydantic model for YAML, API and store.

The vocabulary is that of ``shared/design/gateway.example.yaml``; every field,
its default and why is listed in ``docs/configuration.md``. Models are frozen
(a loaded configuration is an immutable snapshot) and refuse unknown keys, so
a typo is an error naming the field rather than a silently ignored setting.
Checks that span several fields live in ``smtpgate.config.validate``.
"""

from __future__ import annotations

import ipaddress
import socket
import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic import Strict as StrictMode

from smtpgate.model.domain import DomainError
from smtpgate.model.domain import normalise_domain as domain_normal_form

Security = Literal["starttls", "require-starttls", "implicit-tls", "none"]
RelayMode = Literal["none", "full", "restricted-external", "restricted-internal", "blocked"]
DmarcPolicy = Literal["enforce", "report"]
TlsVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]


class Strict(BaseModel):
    """Unknown keys are errors, and so are values of the wrong type: ``0`` is not
    ``false`` and ``"25"`` is not a port (YAML and JSON both type their scalars)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# File names are written as strings in YAML and JSON.
FilePath = Annotated[Path, StrictMode(strict=False)]


def _encrypted_or_redacted(value: SecretStr, info: SerializationInfo) -> str:
    """Secrets hold ``enc:v1:`` tokens, never clear text, so the stored document,
    exports and API replies carry the token; ``context={"redact": True}`` hides it."""
    context = info.context or {}
    return "<redacted>" if context.get("redact") else value.get_secret_value()


# An encrypted secret: SecretStr in memory (repr shows ****), the token in JSON.
EncryptedSecret = Annotated[
    SecretStr, PlainSerializer(_encrypted_or_redacted, return_type=str, when_used="json")
]


def normalise_domain(value: str) -> str:
    """A domain name in the one normal form the gateway compares and relays
    (:func:`smtpgate.model.domain.normalise_domain`: lower case, A-labels,
    IDNA 2008 with UTS #46 mapping; no trailing dot)."""
    try:
        return domain_normal_form(value.strip())
    except DomainError as exc:
        raise ValueError(f"{value!r} is not a domain name: {exc.reason}") from None


DomainName = Annotated[str, AfterValidator(normalise_domain)]


def _default_hostname() -> str:
    return socket.getfqdn()


class DnsSettings(Strict):
    """The resolver for reverse DNS (and later MX); empty nameservers: the system's."""

    nameservers: list[str] = Field(default_factory=list)
    port: int = Field(default=53, gt=0, lt=65536)
    timeout: float = Field(default=5.0, gt=0)

    @field_validator("nameservers")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_address(entry)
        return value


class GatewaySettings(Strict):
    hostname: str = Field(default_factory=_default_hostname, description="banner and EHLO name")
    node: str = "gw1"
    roles: list[str] = Field(default_factory=lambda: ["edge"])
    data_dir: FilePath = Path("./var")
    admin_address: str | None = None
    # The greeting is "220 <hostname> <banner>"; printable ASCII on one line.
    banner: str = Field(default="ESMTP smtpgate", pattern=r"^[ -~]{1,200}$")
    dns: DnsSettings = Field(default_factory=DnsSettings)
    # The configuration store: "" is SQLite in data_dir/config.db; or a URL
    # (sqlite:///PATH, postgresql://USER@HOST:PORT/DB?sslmode=...); the password
    # comes from store_password_file (0600) or libpq's environment, never the URL.
    store: str = ""
    store_password_file: FilePath | None = None
    # Started as root, `serve` binds its ports, gives data_dir to this user and
    # drops to it (group: the user's own unless named); root without it is refused
    # unless allow_root.
    user: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")
    group: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")
    allow_root: bool = False
    # Worker processes, each with its own event loop, sharing the listening
    # sockets and the queue; None: one per core.
    workers: int | None = Field(default=None, ge=1, le=64)
    # "per-core": worker i (and its threads) runs on the i-th CPU it may use,
    # so a worker's threads wake each other on one core; "none": the kernel
    # places them. Only with several workers.
    cpu_affinity: Literal["none", "per-core"] = "none"

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return normalise_domain(value) if value != "localhost" else value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        problem = store_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value


STORE_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://")


def store_url_problem(url: str) -> str | None:
    """Why ``url`` cannot name the configuration store, or None. The message
    never repeats a password written into the URL."""
    if url == "":
        return None
    if not url.startswith(STORE_SCHEMES):
        shown = url.split("://", 1)[0] + "://…" if "://" in url else repr(url)
        return f"{shown} is not a store URL: use " + ", ".join(s + "…" for s in STORE_SCHEMES)
    if url.startswith("postgresql"):
        scheme, rest = url.split("://", 1)
        authority, slash, path = rest.partition("/")
        user, _at, host = authority.rpartition("@")
        if ":" in user:
            shown = f"{scheme}://{user.split(':', 1)[0]}:***@{host}{slash}{path}"
            return (
                f"{shown}: the URL must not carry a password (it would be stored and shown); "
                "use gateway.store_password_file or libpq's PGPASSFILE"
            )
    return None


def parse_listen_address(value: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` or ``"[::1]:2525"`` → (host, port); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ValueError(f"{value!r} is not HOST:PORT (for IPv6 use [ADDR]:PORT)")
    if int(port) > 65535:
        raise ValueError(f"port {int(port)} is out of range (1–65535)")  # noqa: RUF001 - a range
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"{host!r} is not an IP address to listen on") from exc
    return host, int(port)


class RequireCertificate(Strict):
    """The client must present this certificate (an end certificate: exactly it;
    an intermediate or root: any certificate issued under it)."""

    require_certificate: str = Field(min_length=1)


class RequireSpkiPin(Strict):
    """The client's certificate must chain to a trusted CA and carry this public key
    (base64 SHA-256 of its SubjectPublicKeyInfo, as ``smtpgate certs list`` shows)."""

    require_spki_pin: str = Field(min_length=44, max_length=44)


class Listener(Strict):
    name: str = Field(min_length=1)
    address: str
    security: Security = "starttls"
    certificate: str | None = None
    client_identity: Literal["any", "trusted"] | RequireCertificate | RequireSpkiPin = "any"
    proxy_protocol: bool = False
    plaintext_auth_on_loopback: bool = False  # AUTH without TLS, for loopback clients only

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_listen_address(value)
        return value

    @property
    def host(self) -> str:
        return parse_listen_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_listen_address(self.address)[1]


class Certificate(Strict):
    """A named certificate: PEM (leaf first, then chain; key separate or inside)
    or PKCS#12 opened with a PIN (its password)."""

    name: str = Field(min_length=1)
    cert: FilePath | None = None
    key: FilePath | None = None
    pkcs12: FilePath | None = None
    pin_file: FilePath | None = None
    pin: EncryptedSecret | None = None  # encrypted: enc:v1:...

    @model_validator(mode="after")
    def _one_source(self) -> Certificate:
        if (self.cert is None) == (self.pkcs12 is None):
            raise ValueError("set exactly one of cert (PEM) and pkcs12")
        if self.pkcs12 is None and (self.pin is not None or self.pin_file is not None):
            raise ValueError("a PIN belongs to a pkcs12 certificate")
        if self.pkcs12 is not None and self.key is not None:
            raise ValueError("a pkcs12 file carries its own key")
        if self.pin is not None and self.pin_file is not None:
            raise ValueError("set either pin (encrypted) or pin_file")
        if self.pin is not None and not self.pin.get_secret_value().startswith("enc:"):
            raise ValueError("pin must be encrypted: use `smtpgate credentials encrypt`")
        return self


class Limits(Strict):
    """Per-session and per-server limits; defaults follow Postfix."""

    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_ip: int = Field(default=50, ge=1)
    # The share of max_connections only clients a profile names by IP/CIDR may use.
    profile_reserve: float = Field(default=0.1, ge=0, lt=1)
    max_command_line: int = Field(default=512, ge=512)
    command_line_allowance: int = Field(default=1024, ge=0)
    max_line_length: int = Field(default=8192, ge=1000)
    max_recipients: int = Field(default=1000, ge=1)
    max_message_size: int = Field(default=10_240_000, ge=1024)
    max_header_size: int = Field(default=102_400, ge=1024)
    max_errors: int = Field(default=20, ge=1)
    # Octets per second that extend the DATA/BDAT deadline (Postfix smtpd_min_data_rate).
    min_data_rate: int = Field(default=500, ge=0)
    max_auth_failures: int = Field(default=5, ge=1)
    auth_failure_window: float = Field(default=600, gt=0)
    auth_lockout: float = Field(default=900, ge=0)
    auth_failure_delay: float = Field(default=1.0, ge=0)

    @property
    def reserved_connections(self) -> int:
        """How many of ``max_connections`` ``profile_reserve`` keeps."""
        return int(self.max_connections * self.profile_reserve)


class Timeouts(Strict):
    """Seconds; see RFC 5321 §4.5.3.2 for the phases."""

    command: float = Field(default=300, gt=0)  # §4.5.3.2.7 server timeout
    data: float = Field(default=180, gt=0)  # between data blocks, §4.5.3.2.5
    tls_handshake: float = Field(default=60, gt=0)
    proxy_header: float = Field(default=10, gt=0)
    shutdown_grace: float = Field(default=30, ge=0)
    delivery_connect: float = Field(default=30, gt=0)
    delivery_command: float = Field(default=300, gt=0)
    delivery_data_end: float = Field(default=600, gt=0)  # §4.5.3.2.6


def parse_duration(value: object) -> float:
    """Seconds from ``300``, ``"30s"``, ``"5m"``, ``"1h"`` or ``"5d"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or like 30s, 5m, 1h, 5d")  # noqa: TRY004 - pydantic reports ValueError as a field error
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value[:-1].replace(".", "", 1).isdigit():
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        if value[-1] not in units:
            raise ValueError(f"{value!r}: use s, m, h or d")
        seconds = float(value[:-1]) * units[value[-1]]
    elif isinstance(value, str) and value.replace(".", "", 1).isdigit():
        seconds = float(value)
    else:
        raise ValueError(f"{value!r} is not a duration (like 30s, 5m, 1h, 5d)")
    if not 0 <= seconds <= MAX_DURATION:
        raise ValueError("a duration is between 0 and 3650 days")
    return seconds


MAX_DURATION = 3650 * 86400.0
# The API schema says what the validator accepts: seconds, or a number and a unit.
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_DURATION},
                {"type": "string", "pattern": "^[0-9]{1,6}(\\.[0-9]{1,3})?[smhd]?$"},
            ]
        }
    ),
]


class Smarthost(Strict):
    host: str = Field(min_length=1)
    port: int = Field(default=25, gt=0, lt=65536)
    username: str | None = None
    password: EncryptedSecret | None = None  # encrypted: enc:v1:...
    password_file: FilePath | None = None

    @model_validator(mode="after")
    def _credentials(self) -> Smarthost:
        secret = self.password is not None or self.password_file is not None
        if secret != (self.username is not None):
            raise ValueError("username and one of password/password_file go together")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password (encrypted) or password_file")
        if self.password is not None and not self.password.get_secret_value().startswith("enc:"):
            raise ValueError("password must be encrypted: use `smtpgate credentials encrypt`")
        return self


class DirectDelivery(Strict):
    """Delivery by DNS MX (A/AAAA when there is no MX)."""

    port: int = Field(default=25, gt=0, lt=65536)


class DeliverBy(Strict):
    smarthost: Smarthost | None = None
    dns: DirectDelivery | None = None

    @model_validator(mode="after")
    def _one_target(self) -> DeliverBy:
        if (self.smarthost is None) == (self.dns is None):
            raise ValueError("set exactly one of smarthost and dns")
        return self


class Namespace(Strict):
    sender: str = "*"
    recipient: str = "*"


class SendConnector(Strict):
    name: str = Field(min_length=1)
    roles: list[str] = Field(default_factory=list)
    deliver: DeliverBy
    security: Security = "starttls"
    cost: int = Field(default=10, ge=0)
    namespaces: list[Namespace] = Field(default_factory=lambda: [Namespace()])
    # Try the next connector only when this one cannot be reached at all.
    failover_when_unreachable: bool = False
    client_certificate: str | None = None  # client identity presented to next hops


class Pop3Mailbox(Strict):
    """One mailbox a POP3 connector empties; its mail goes to ``deliver_to``."""

    username: str = Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")
    password: EncryptedSecret | None = None  # encrypted: enc:v1:...
    password_file: FilePath | None = None
    deliver_to: list[str] = Field(min_length=1, max_length=100)  # envelope recipients

    @model_validator(mode="after")
    def _secret(self) -> Pop3Mailbox:
        if (self.password is None) == (self.password_file is None):
            raise ValueError("set either password (encrypted) or password_file")
        if self.password is not None and not self.password.get_secret_value().startswith("enc:"):
            raise ValueError("password must be encrypted: use `smtpgate credentials encrypt`")
        if any("@" not in a or any(c in a for c in " <>\r\n") for a in self.deliver_to):
            raise ValueError("deliver_to takes mail addresses (local@domain)")
        return self


class Pop3Connector(Strict):
    """A receive connector that fetches mail from POP3 mailboxes (``fetch/``)."""

    name: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, gt=0, lt=65536)  # None: 995 implicit TLS, else 110
    security: Security = "require-starttls"
    validate_certificate: bool = True  # chain (system store and tls.ca_files) and host name
    mailboxes: list[Pop3Mailbox] = Field(min_length=1, max_length=100)
    interval: Duration = 300.0  # seconds between polls
    roles: list[str] = Field(default_factory=list)  # nodes with one of these roles fetch
    profile: str | None = None  # the connection profile its mail is taken under
    max_messages: int = Field(default=200, ge=1, le=10_000)  # fetched per mailbox and poll

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 995 if self.security == "implicit-tls" else 110


class ReceiveConnectors(Strict):
    pop3: list[Pop3Connector] = Field(default_factory=list)


class RetrySettings(Strict):
    """Postfix: minimal_backoff_time, maximal_backoff_time, maximal_queue_lifetime."""

    first: Duration = 300.0
    max_backoff: Duration = 4000.0
    lifetime: Duration = 5 * 86400.0


class ConnectorHealthSettings(Strict):
    """When a (send connector, destination) pair counts as down, and how often a
    down pair lets one attempt through as the probe (``delivery/health.py``)."""

    down_after: int = Field(default=3, ge=1, le=1000)  # consecutive failures
    probe_interval: Duration = 30.0


class ShapingRule(Strict):
    """Limits for the (send connector, destination) pairs both patterns match; the
    first matching rule applies (``queue/shaping.py``)."""

    connector: str = Field(default="*", min_length=1, max_length=255)
    destination: str = Field(default="*", min_length=1, max_length=255)  # domain or host:port
    concurrency: int | None = Field(default=None, ge=1, le=1000)
    messages_per_connection: int | None = Field(default=None, ge=1, le=100_000)
    rate_per_minute: int | None = Field(default=None, ge=1, le=100_000)


class QueueSettings(Strict):
    retry: RetrySettings = Field(default_factory=RetrySettings)
    delay_warning: Duration | None = 4 * 3600.0  # None: no delay warnings
    max_deliveries: int = Field(default=100, ge=1)  # attempts at once
    destination_concurrency: int = Field(default=20, ge=1)  # per destination (Postfix: 20)
    connection_cache_time: Duration = 5.0  # keep an idle connection for reuse this long
    connector_health: ConnectorHealthSettings = Field(default_factory=ConnectorHealthSettings)
    shaping: list[ShapingRule] = Field(default_factory=list, max_length=1000)
    shaping_feedback_hold: Duration = 300.0  # a "too many connections" lowers for this long


def normalise_client_host(value: str) -> str:
    """An IP address, a CIDR range or a host FQDN, in canonical form.

    Legacy wildcards (``10.100.80.*``) are converted before this runs, by
    :func:`convert_wildcard` in the loader, which also records a notice.
    """
    text = value.strip()
    if "*" in text:
        converted = convert_wildcard(text)
        if converted is None:
            raise ValueError(f"{value!r}: wildcards are only allowed as whole trailing octets")
        text = converted
    if "/" in text:
        try:
            return str(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a CIDR range ({exc})") from None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if text.replace(".", "").isdigit():
        raise ValueError(f"{value!r} is not an IP address")
    try:
        return normalise_domain(text)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither an IP address, a CIDR range nor a host name"
        ) from None


def convert_wildcard(value: str) -> str | None:
    """``10.100.80.*`` → ``10.100.80.0/24``; None if it is not a legacy wildcard."""
    octets = value.strip().split(".")
    if len(octets) != 4 or octets[0] == "*":
        return None
    fixed = [o for o in octets if o != "*"]
    stars = len(octets) - len(fixed)
    if not stars or octets[: len(fixed)] != fixed or not all(o.isdigit() for o in fixed):
        return None
    try:
        network = ipaddress.ip_network(".".join(fixed + ["0"] * stars) + f"/{8 * len(fixed)}")
    except ValueError:
        return None
    return str(network)


ClientHost = Annotated[str, AfterValidator(normalise_client_host)]


class InboundTls(Strict):
    mandatory: bool = False


class OutboundTls(Strict):
    """When this gateway sends to the profile's hosts (applied by the TLS work)."""

    mandatory: bool = False
    protocols: Literal["global"] | list[TlsVersion] = "global"
    cipher_strength: Literal["global", "high", "medium", "any"] = "global"
    validate_certificate: bool = False
    match: list[str] = Field(default_factory=lambda: ["hostname"])


class Credential(Strict):
    """One SMTP AUTH user; the password encrypted (``enc:...``) or in a file."""

    username: str = Field(min_length=1, max_length=255)
    password: EncryptedSecret | None = None
    password_file: FilePath | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> Credential:
        if (self.password is None) == (self.password_file is None):
            raise ValueError("set exactly one of password (encrypted) and password_file")
        if self.password is not None and not self.password.get_secret_value().startswith("enc:"):
            raise ValueError(
                "password must be encrypted: run `smtpgate credentials encrypt` "
                "and paste its output, or use password_file"
            )
        if any(ch in self.username for ch in "\x00\r\n"):
            raise ValueError("user names cannot contain NUL, CR or LF")
        return self


class SmtpAuth(Strict):
    enabled: bool = False
    credentials: list[Credential] = Field(default_factory=list)


class ConnectionProfile(Strict):
    name: str = Field(min_length=1)
    notes: str = ""
    client_hosts: list[ClientHost] = Field(default_factory=list)
    sender_domains: list[DomainName] = Field(default_factory=list)
    relay: RelayMode = "none"
    inbound_tls: InboundTls = Field(default_factory=InboundTls)
    outbound_tls: OutboundTls = Field(default_factory=OutboundTls)
    smtp_auth: SmtpAuth = Field(default_factory=SmtpAuth)
    dmarc_policy: DmarcPolicy = "enforce"  # sender_auth: act on p=reject / p=quarantine


class DefaultProfile(Strict):
    """What every client that matches no connection profile gets."""

    relay: RelayMode = "none"
    inbound_tls: InboundTls = Field(default_factory=InboundTls)
    outbound_tls: OutboundTls = Field(default_factory=OutboundTls)
    dmarc_policy: DmarcPolicy = "enforce"  # sender_auth: act on p=reject / p=quarantine


DEFAULT_PROTOCOLS: tuple[TlsVersion, ...] = ("TLSv1.2", "TLSv1.3")
TLS_ORDER: tuple[TlsVersion, ...] = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


class TlsSettings(Strict):
    opportunistic: bool = True  # offer STARTTLS where the listener can
    ca_files: list[FilePath] = Field(default_factory=list)  # trusted besides the system store
    protocols: list[TlsVersion] = Field(default_factory=lambda: list(DEFAULT_PROTOCOLS))
    cipher_strength: Literal["high", "medium", "any"] = "high"

    @field_validator("protocols")
    @classmethod
    def _contiguous(cls, value: list[TlsVersion]) -> list[TlsVersion]:
        chosen = sorted({TLS_ORDER.index(v) for v in value})
        if not chosen:
            raise ValueError("name at least one protocol")
        if chosen != list(range(chosen[0], chosen[-1] + 1)):
            raise ValueError("protocols must be a contiguous range, e.g. [TLSv1.2, TLSv1.3]")
        return [TLS_ORDER[i] for i in chosen]


StsMode = Literal["none", "testing", "enforce"]


class DomainTransport(Strict):
    """One recipient domain's MTA-STS mode, replacing what the domain publishes:
    ``none`` ignores its policy, ``testing`` only reports, ``enforce`` enforces (with
    no published policy: TLS with a WebPKI-valid certificate for the MX host)."""

    domain: DomainName
    mta_sts: StsMode


class TlsRptSettings(Strict):
    """TLS reporting (RFC 8460): daily aggregate reports to the ``rua`` of the
    recipient domains that publish ``_smtp._tls`` records."""

    enabled: bool = False
    organization: str = Field(default="", pattern=r"^[ -~]{0,200}$")
    contact: str = Field(default="", pattern=r"^[ -~]{0,200}$")  # contact-info in the report


class OutboundSecurity(Strict):
    """Transport security the recipient domains publish, for direct (MX) delivery:
    MTA-STS (RFC 8461), DANE (RFC 7672; needs a local DNSSEC-validating resolver in
    ``gateway.dns``, whose AD bit is trusted) and TLS reporting (RFC 8460)."""

    mta_sts: bool = True
    dane: bool = False
    mta_sts_port: int = Field(default=443, gt=0, lt=65536)  # of mta-sts.DOMAIN; labs and tests
    domains: list[DomainTransport] = Field(default_factory=list)
    tlsrpt: TlsRptSettings = Field(default_factory=TlsRptSettings)


class RspamdSettings(Strict):
    """Spam scanning by rspamd over its HTTP protocol (``POST /checkv2``) for the
    messages whose profile decided on a spam check (docs/content-security.md)."""

    url: str = "http://127.0.0.1:11333"  # the normal worker (or the proxy)
    timeout: Duration = 15.0  # the whole check: connect, stream, verdict
    fail: Literal["open", "closed"] = "open"  # rspamd unreachable: accept (header) or 451
    max_size: int = Field(default=20 * 1024 * 1024, ge=1024)  # larger: not scanned (header)
    password_file: FilePath | None = None  # sent as rspamd's Password header (0600)
    quarantine_score: float | None = None  # score at or above: quarantine (reject stays reject)
    headers: bool = True  # write X-Spam-Status / -Score / -Flag / -Symbols

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.strip("/"):
            raise ValueError("rspamd's url is http://HOST:PORT (or https://)")
        if any(c in value for c in "\x00\r\n ") or "?" in value or "#" in value:
            raise ValueError("rspamd's url has no spaces, query or fragment")
        return value.rstrip("/")

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0 < value <= 300:
            raise ValueError("rspamd's timeout is between 0 and 300 seconds")
        return value


class SpamSettings(Strict):
    check_outbound: bool = False  # also scan mail from full / restricted-internal clients
    rspamd: RspamdSettings | None = None  # None: no spam scanning


class VirusSettings(Strict):
    """Virus scanning by ClamAV's clamd over INSTREAM (docs/content-security.md);
    an empty ``clamd`` turns it off. Every message is scanned, both directions."""

    clamd: str = ""  # "tcp://127.0.0.1:3310" or "unix:/run/clamav/clamd.ctl"
    timeout: Duration = 30.0  # the whole scan: connect, stream, verdict
    fail: Literal["open", "closed"] = "closed"  # clamd unreachable: accept (header) or 451
    infected: Literal["reject", "quarantine"] = "reject"
    over_limit: Literal["accept", "reject", "tempfail"] = "accept"  # accept: header "unchecked"
    max_size: int = Field(default=25 * 1024 * 1024, ge=1024)  # ≤ clamd's StreamMaxLength

    @field_validator("clamd")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            parse_clamd_address(value)
        return value


def parse_clamd_address(value: str) -> tuple[str, int] | str:
    """``tcp://HOST:PORT`` → (host, port); ``unix:/PATH`` → the socket's path."""
    if value.startswith("unix:"):
        path = value.removeprefix("unix:").removeprefix("//")
        if not path.startswith("/"):
            raise ValueError("a clamd unix socket is unix:/absolute/path")
        return path
    if value.startswith("tcp://"):
        try:
            host, port = parse_listen_address(value.removeprefix("tcp://"))
        except ValueError:
            raise ValueError("clamd is tcp://IP:PORT (an IP address) or unix:/PATH") from None
        if port == 0:
            raise ValueError("name clamd's port: tcp://HOST:PORT")
        return host, port
    raise ValueError("clamd is tcp://HOST:PORT or unix:/PATH")


class QuarantineSettings(Strict):
    """Messages held by a scanner's verdict, in ``data_dir/quarantine``; expired
    (deleted) by the running gateway after ``retention_days``."""

    retention_days: int = Field(default=30, ge=1, le=3650)


class TrackingSettings(Strict):
    """Message tracking records (``data_dir/tracking.db``, node-local), deleted
    after ``retention_days`` by the running gateway."""

    retention_days: int = Field(default=7, ge=1, le=3650)


SYSLOG_ADDRESS = r"^(|/[^\x00]{1,200}|[A-Za-z0-9.:\[\]-]{1,200}:[0-9]{1,5})$"


class LoggingSettings(Strict):
    """Where the log goes: ``stderr``, ``syslog`` (facility mail, to
    ``syslog_address``: a socket path, default /dev/log, or HOST:PORT over UDP)
    or ``journald`` (its syslog socket, /dev/log)."""

    target: Literal["stderr", "syslog", "journald"] = "stderr"
    syslog_address: str = Field(default="", pattern=SYSLOG_ADDRESS)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DKIM_SELECTOR = rf"^{_LABEL}(?:\.{_LABEL})*$"  # RFC 6376 §3.1: dot-separated labels


class DkimSigning(Strict):
    """One sender domain's DKIM key (RFC 6376): a PEM file only its owner can
    read (``smtpgate dkim keygen``) or the key of a named certificate."""

    domain: DomainName
    selector: str = Field(pattern=DKIM_SELECTOR, max_length=63)
    key_file: FilePath | None = None
    certificate: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> DkimSigning:
        if (self.key_file is None) == (self.certificate is None):
            raise ValueError("set exactly one of key_file and certificate")
        return self


class SenderAuthSettings(Strict):
    """SPF, DKIM and DMARC of mail from outside; DKIM signing of mail from inside."""

    verify: bool = True  # write Authentication-Results; DMARC per profile's dmarc_policy
    authserv_id: str = Field(default="", pattern=r"^[A-Za-z0-9.-]{0,253}$")  # "": hostname
    timeout: float = Field(default=20.0, gt=0, le=120)  # all DNS of one message
    max_message_bytes: int = Field(default=10 * 1024 * 1024, gt=0)  # DKIM reads it whole
    dkim_signing: list[DkimSigning] = Field(default_factory=list)


class AdminSettings(Strict):
    """The REST API's and the console's listener; an empty ``listen`` turns them
    off. ``certificate`` (a ``certificates`` entry) serves HTTPS; none: plain HTTP.
    ``metrics_public``: ``/metrics`` answers anyone who reaches the listener
    (else only loopback clients, or an API token)."""

    listen: str = "127.0.0.1:8025"
    certificate: str | None = None
    metrics_public: bool = False

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_listen_address(value)
        return value


RecipientMode = Literal["any", "list", "callout", "ldap"]
MAX_LISTED_RECIPIENTS = 100_000  # inline entries; a recipients_file is bounded in bytes


class CalloutSettings(Strict):
    """An SMTP callout (RCPT probe) to the domain's internal server, and its cache."""

    timeout: float = Field(default=10, gt=0, le=120)  # the whole probe, queueing included
    positive_ttl: Duration = 3600.0  # a known recipient is remembered this long (0: not)
    negative_ttl: Duration = 600.0  # an unknown one this long (0: not)
    cache_size: int = Field(default=10_000, ge=0)  # addresses remembered for this domain
    concurrency: int = Field(default=4, ge=1, le=100)  # probes at once per send connector


LDAP_FILTER_FIELDS = ("address", "local", "domain")


class LdapSettings(Strict):
    """A directory lookup: a recipient exists when ``filter`` finds an entry under
    ``base`` (``docs/content-security.md``); cached like a callout's results."""

    url: str = Field(pattern=r"^ldaps?://[^/?#\s]+/?$")  # ldap://host:389, ldaps://host:636
    start_tls: bool = False  # ldap:// then StartTLS (RFC 4513 §3); never with ldaps://
    bind_dn: str | None = Field(default=None, min_length=1)  # none: anonymous
    password_file: FilePath | None = None  # the bind password (mode 0600)
    base: str = Field(min_length=1)
    filter: str = Field(default="(mail={address})", min_length=3, max_length=1000)
    timeout: float = Field(default=5, gt=0, le=60)  # the whole lookup, queueing included
    positive_ttl: Duration = 3600.0
    negative_ttl: Duration = 600.0
    cache_size: int = Field(default=10_000, ge=0)
    concurrency: int = Field(default=4, ge=1, le=100)  # lookups at once per directory

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if not fields or not fields <= set(LDAP_FILTER_FIELDS):
            raise ValueError("the filter uses {address}, {local} or {domain}, and only those")
        if not (value.startswith("(") and value.endswith(")")):
            raise ValueError("an LDAP filter is in parentheses (RFC 4515)")
        return value

    @model_validator(mode="after")
    def _tls_and_bind(self) -> LdapSettings:
        if self.start_tls and self.url.startswith("ldaps:"):
            raise ValueError("start_tls is for ldap:// URLs; ldaps:// is TLS already")
        if self.password_file is not None and self.bind_dn is None:
            raise ValueError("a password_file needs a bind_dn")
        return self


class RecipientValidation(Strict):
    """How RCPT checks recipients at one hosted domain (``docs/content-security.md``):
    ``any`` accepts every local part, ``list`` the ones listed (inline and/or a
    file, re-read when it changes), ``callout`` asks the internal server,
    ``ldap`` a directory."""

    domain: DomainName
    mode: RecipientMode = "any"
    recipients: list[str] = Field(default_factory=list, max_length=MAX_LISTED_RECIPIENTS)
    recipients_file: FilePath | None = None
    callout: CalloutSettings = Field(default_factory=CalloutSettings)
    ldap: LdapSettings | None = None  # mode ldap

    @field_validator("recipients")
    @classmethod
    def _entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry or any(ch.isspace() for ch in entry) or entry.count("@") > 1:
                raise ValueError(f"{entry!r} is not a local part or an address")
        return value

    @model_validator(mode="after")
    def _list_has_entries(self) -> RecipientValidation:
        if self.mode == "list" and not self.recipients and self.recipients_file is None:
            raise ValueError("mode list needs recipients or a recipients_file")
        if self.mode == "ldap" and self.ldap is None:
            raise ValueError("mode ldap needs ldap settings (url, base)")
        for entry in self.recipients:
            if "@" in entry and normalise_domain(entry.rpartition("@")[2]) != self.domain:
                raise ValueError(f"{entry!r} is not an address at {self.domain}")
        return self


class GatewayConfig(Strict):
    """The whole configuration document."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    hosted_domains: list[DomainName] = Field(default_factory=list)
    listeners: list[Listener] = Field(default_factory=list)
    certificates: list[Certificate] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    send_connectors: list[SendConnector] = Field(default_factory=list)
    receive_connectors: ReceiveConnectors = Field(default_factory=ReceiveConnectors)
    connection_profiles: list[ConnectionProfile] = Field(default_factory=list)
    default_profile: DefaultProfile = Field(default_factory=DefaultProfile)
    spoof_detection: bool = True
    tls: TlsSettings = Field(default_factory=TlsSettings)
    outbound_security: OutboundSecurity = Field(default_factory=OutboundSecurity)
    spam: SpamSettings = Field(default_factory=SpamSettings)
    sender_auth: SenderAuthSettings = Field(default_factory=SenderAuthSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    recipient_validation: list[RecipientValidation] = Field(default_factory=list)
    virus: VirusSettings = Field(default_factory=VirusSettings)
    quarantine: QuarantineSettings = Field(default_factory=QuarantineSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
