"""Checks that span several fields of a configuration, with the field path.

Each check is a function from the model to a list of problems, so that
``smtpgate config check`` reports every problem at once. A problem inside a
named object (a listener, certificate, send connector, connection profile or
credential) says which one in its message (:func:`name_objects`); the path
stays the machine-readable field path that the API returns.
"""

from __future__ import annotations

import ipaddress
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from smtpgate.config.document import KEYS, LABELS
from smtpgate.config.schema import (
    ConnectionProfile,
    GatewayConfig,
    RequireCertificate,
    parse_listen_address,
)
from smtpgate.errors import FieldProblem

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_ITEM = re.compile(r"(?:^|\.)(\w+)\[(\d+)\]")
_NESTED_LABELS = {"credentials": "user"}


def _item_name(document: Any, path: str) -> list[tuple[str, str]]:
    """(label, name) of each named list item along ``path``, outermost first."""
    found = []
    node = document
    position = 0
    for match in _ITEM.finditer(path):
        for part in path[position : match.start(1)].strip(".").split("."):
            node = _child(node, part) if part else node
        node = _child(_child(node, match.group(1)), int(match.group(2)))
        position = match.end()
        key = KEYS.get(match.group(1))
        name = _child(node, key) if key else None
        if isinstance(name, str) and name:
            label = LABELS.get(match.group(1)) or _NESTED_LABELS[match.group(1)]
            found.append((label, name))
    return found


def _child(node: Any, part: str | int) -> Any:
    if isinstance(part, int):
        return node[part] if isinstance(node, list | tuple) and 0 <= part < len(node) else None
    if isinstance(node, dict):
        return node.get(part)
    return getattr(node, part, None) if node is not None else None


def name_objects(problems: list[FieldProblem], document: Any) -> list[FieldProblem]:
    """Each problem with the named objects it lies in, from ``document`` (a parsed
    mapping or the model): ``connection profile 'lab': ...``. A name that the
    message already quotes is not repeated."""
    named = []
    for problem in problems:
        labels = [
            f"{label} {name!r}"
            for label, name in _item_name(document, problem.path)
            if repr(name) not in problem.message
        ]
        message = f"{', '.join(labels)}: {problem.message}" if labels else problem.message
        named.append(FieldProblem(problem.path, message))
    return named


def _duplicates(section: str, names: Iterable[str]) -> list[FieldProblem]:
    seen: set[str] = set()
    problems = []
    for index, name in enumerate(names):
        if name in seen:
            problems.append(FieldProblem(f"{section}[{index}].name", f"duplicate name {name!r}"))
        seen.add(name)
    return problems


def unique_names(config: GatewayConfig) -> list[FieldProblem]:
    return (
        _duplicates("listeners", (x.name for x in config.listeners))
        + _duplicates("certificates", (x.name for x in config.certificates))
        + _duplicates("send_connectors", (x.name for x in config.send_connectors))
        + _duplicates("connection_profiles", (x.name for x in config.connection_profiles))
    )


def client_network(entry: str) -> IpNetwork | None:
    """The addresses a ``client_hosts`` entry stands for (None for a host name):
    ``10.0.0.5`` is ``10.0.0.5/32``, and IPv4-mapped IPv6 (``::ffff:10.0.0.5``,
    ``::ffff:10.0.0.0/120``) is the IPv4 network, as clients are matched as IPv4
    (RFC 4291 §2.5.5.2)."""
    try:
        network = ipaddress.ip_network(entry)
    except ValueError:
        return None
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None and network.prefixlen >= 96:
        return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


def _first_places(
    config: GatewayConfig,
    field: str,
    values: Callable[[ConnectionProfile], list[str]],
    key: Callable[[str], str] = str.lower,
) -> list[FieldProblem]:
    """Entries that appear twice (by ``key``), in one profile or across profiles."""
    seen: dict[str, tuple[str, str]] = {}
    problems = []
    for i, profile in enumerate(config.connection_profiles):
        for j, value in enumerate(values(profile)):
            here = f"connection_profiles[{i}].{field}[{j}]"
            first = seen.get(key(value))
            if first is None:
                seen[key(value)] = (value, f"{here} (profile {profile.name!r})")
                continue
            written, place = first
            as_written = f" as {written}" if written != value else ""
            problems.append(FieldProblem(here, f"{value} is already listed{as_written} at {place}"))
    return problems


def _client_host_key(entry: str) -> str:
    network = client_network(entry)
    return str(network) if network is not None else entry.lower()


def unique_client_hosts(config: GatewayConfig) -> list[FieldProblem]:
    """``127.0.0.2``, ``127.0.0.2/32`` and ``::ffff:127.0.0.2`` are one entry."""
    return _first_places(config, "client_hosts", lambda p: p.client_hosts, _client_host_key)


def unique_sender_domains(config: GatewayConfig) -> list[FieldProblem]:
    return _first_places(config, "sender_domains", lambda p: p.sender_domains)


def unique_usernames(config: GatewayConfig) -> list[FieldProblem]:
    """User names apply across all connection profiles, so each may appear once."""
    seen: dict[str, str] = {}
    problems = []
    for i, profile in enumerate(config.connection_profiles):
        for j, credential in enumerate(profile.smtp_auth.credentials):
            here = f"connection_profiles[{i}].smtp_auth.credentials[{j}].username"
            if credential.username in seen:
                problems.append(
                    FieldProblem(
                        here,
                        f"user name {credential.username!r} is already used "
                        f"by {seen[credential.username]}; user names are "
                        "shared by all connection profiles",
                    )
                )
            else:
                seen[credential.username] = f"profile {profile.name!r}"
    return problems


def sender_domains_need_opportunistic_tls(config: GatewayConfig) -> list[FieldProblem]:
    if config.tls.opportunistic:
        return []
    return [
        FieldProblem(
            f"connection_profiles[{i}].sender_domains",
            "a sender domain selects a profile only to require inbound TLS, which needs "
            "STARTTLS to be offered: set tls.opportunistic: true or remove the sender domains",
        )
        for i, profile in enumerate(config.connection_profiles)
        if profile.sender_domains
    ]


def secret_files(config: GatewayConfig) -> list[tuple[str, Path]]:
    """Every file that holds a secret other than a private key, with its field
    path: credential passwords, smarthost passwords, PKCS#12 PINs. (Key files
    are checked where certificates are loaded.)"""
    found = [
        (f"connection_profiles[{i}].smtp_auth.credentials[{j}].password_file", c.password_file)
        for i, profile in enumerate(config.connection_profiles)
        for j, c in enumerate(profile.smtp_auth.credentials)
        if c.password_file is not None
    ]
    for i, connector in enumerate(config.send_connectors):
        target = connector.deliver.smarthost
        if target is not None and target.password_file is not None:
            found.append(
                (f"send_connectors[{i}].deliver.smarthost.password_file", target.password_file)
            )
    found += [
        (f"receive_connectors.pop3[{i}].mailboxes[{j}].password_file", box.password_file)
        for i, connector in enumerate(config.receive_connectors.pop3)
        for j, box in enumerate(connector.mailboxes)
        if box.password_file is not None
    ]
    if config.gateway.store_password_file is not None:
        found.append(("gateway.store_password_file", config.gateway.store_password_file))
    rspamd = config.spam.rspamd
    if rspamd is not None and rspamd.password_file is not None:
        found.append(("spam.rspamd.password_file", rspamd.password_file))
    found += [
        (f"recipient_validation[{i}].ldap.password_file", rule.ldap.password_file)
        for i, rule in enumerate(config.recipient_validation)
        if rule.ldap is not None and rule.ldap.password_file is not None
    ]
    found += [
        (f"certificates[{i}].pin_file", cert.pin_file)
        for i, cert in enumerate(config.certificates)
        if cert.pin_file is not None
    ]
    return found


def secret_files_are_private(config: GatewayConfig) -> list[FieldProblem]:
    """Each secret file exists and only its owner may read it."""
    problems = []
    for here, path in secret_files(config):
        problem = private_file_problem(path)
        if problem:
            problems.append(FieldProblem(here, problem))
    return problems


def private_file_problem(path: Path, what: str = "") -> str | None:
    """Why a secret file is unusable (missing, or open to group or others), or None."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"{path}{what} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    return None


def dkim_keys_usable(config: GatewayConfig) -> list[FieldProblem]:
    """Each DKIM signing key is a file only its owner can read, or a named
    certificate; one domain has one entry."""
    problems = []
    names = {cert.name for cert in config.certificates}
    seen: set[str] = set()
    for i, entry in enumerate(config.sender_auth.dkim_signing):
        here = f"sender_auth.dkim_signing[{i}]"
        if entry.domain in seen:
            problems.append(FieldProblem(f"{here}.domain", f"{entry.domain} is listed twice"))
        seen.add(entry.domain)
        if entry.key_file is not None:
            problem = private_file_problem(entry.key_file, " holds a private key and")
            if problem:
                problems.append(FieldProblem(f"{here}.key_file", problem))
        elif entry.certificate not in names:
            problems.append(
                FieldProblem(f"{here}.certificate", f"no certificate named {entry.certificate!r}")
            )
    return problems


def unique_addresses(config: GatewayConfig) -> list[FieldProblem]:
    seen: dict[tuple[str, int], str] = {}
    problems = []
    for index, listener in enumerate(config.listeners):
        key = (listener.host, listener.port)
        if key in seen and listener.port != 0:
            problems.append(
                FieldProblem(
                    f"listeners[{index}].address",
                    f"{listener.address} is already used by listener {seen[key]!r}",
                )
            )
        seen[key] = listener.name
    return problems


def tls_listeners_have_certificates(config: GatewayConfig) -> list[FieldProblem]:
    names = {c.name for c in config.certificates}
    problems = []
    for index, listener in enumerate(config.listeners):
        path = f"listeners[{index}].certificate"
        if listener.security != "none" and listener.certificate is None:
            problems.append(
                FieldProblem(
                    path,
                    f"security {listener.security} needs a server certificate; "
                    "name one, or set security: none",
                )
            )
        elif listener.certificate is not None and listener.certificate not in names:
            problems.append(FieldProblem(path, f"no certificate named {listener.certificate!r}"))
        identity = listener.client_identity
        if isinstance(identity, RequireCertificate):
            where = f"listeners[{index}].client_identity.require_certificate"
            if identity.require_certificate not in names:
                problems.append(
                    FieldProblem(where, f"no certificate named {identity.require_certificate!r}")
                )
        if identity != "any" and listener.security == "none":
            problems.append(
                FieldProblem(
                    f"listeners[{index}].client_identity",
                    "a client certificate needs TLS (security is none)",
                )
            )
    return problems


def connector_certificates_exist(config: GatewayConfig) -> list[FieldProblem]:
    names = {c.name for c in config.certificates}
    return [
        FieldProblem(
            f"send_connectors[{i}].client_certificate",
            f"no certificate named {c.client_certificate!r}",
        )
        for i, c in enumerate(config.send_connectors)
        if c.client_certificate is not None and c.client_certificate not in names
    ]


def admin_certificate_exists(config: GatewayConfig) -> list[FieldProblem]:
    name = config.admin.certificate
    if name is None or name in {c.name for c in config.certificates}:
        return []
    return [FieldProblem("admin.certificate", f"no certificate named {name!r}")]


def something_to_listen_on(config: GatewayConfig) -> list[FieldProblem]:
    if not config.listeners:
        return [FieldProblem("listeners", "at least one listener is needed")]
    return []


def recipient_validation_domains(config: GatewayConfig) -> list[FieldProblem]:
    """Recipients are validated only at hosted domains, one rule per domain."""
    problems, seen = [], set()
    for index, rule in enumerate(config.recipient_validation):
        here = f"recipient_validation[{index}].domain"
        if rule.domain not in config.hosted_domains:
            problems.append(FieldProblem(here, f"{rule.domain} is not a hosted domain"))
        elif rule.domain in seen:
            problems.append(FieldProblem(here, f"{rule.domain} already has a rule"))
        seen.add(rule.domain)
    return problems


def pop3_connectors(config: GatewayConfig) -> list[FieldProblem]:
    """Unique names (also among the send connectors: ``connector verify`` takes
    either), an existing profile, and one mailbox user name once per connector."""
    send = {c.name for c in config.send_connectors}
    profiles = {p.name for p in config.connection_profiles}
    problems = _duplicates(
        "receive_connectors.pop3", (c.name for c in config.receive_connectors.pop3)
    )
    for i, connector in enumerate(config.receive_connectors.pop3):
        here = f"receive_connectors.pop3[{i}]"
        if connector.name in send:
            problems.append(FieldProblem(f"{here}.name", "a send connector has this name"))
        if connector.profile is not None and connector.profile not in profiles:
            problems.append(
                FieldProblem(f"{here}.profile", f"no connection profile {connector.profile!r}")
            )
        users = [box.username for box in connector.mailboxes]
        for j, user in enumerate(users):
            if user in users[:j]:
                problems.append(FieldProblem(f"{here}.mailboxes[{j}]", f"{user!r} twice"))
    return problems


def _pop3_warnings(config: GatewayConfig) -> list[FieldProblem]:
    found = []
    for i, connector in enumerate(config.receive_connectors.pop3):
        here = f"receive_connectors.pop3[{i}]"
        if connector.security == "none":
            found.append(
                FieldProblem(
                    f"{here}.security",
                    "the mailbox passwords and the mail would travel unencrypted; use "
                    "implicit-tls (POP3S) or require-starttls",
                )
            )
        elif not connector.validate_certificate:
            found.append(
                FieldProblem(
                    f"{here}.validate_certificate",
                    "off: anyone on the path can pose as the server and collect the passwords",
                )
            )
    return found


def outbound_security_domains(config: GatewayConfig) -> list[FieldProblem]:
    """One MTA-STS override per recipient domain."""
    seen: set[str] = set()
    found = []
    for i, override in enumerate(config.outbound_security.domains):
        if override.domain in seen:
            found.append(
                FieldProblem(
                    f"outbound_security.domains[{i}].domain", f"{override.domain} is listed twice"
                )
            )
        seen.add(override.domain)
    return found


def _outbound_security_warnings(config: GatewayConfig) -> list[FieldProblem]:
    """DANE on a resolver whose AD bit cannot be trusted; MTA-STS switched off."""
    settings, found = config.outbound_security, []
    servers = config.gateway.dns.nameservers
    local = bool(servers) and all(ipaddress.ip_address(s).is_loopback for s in servers)
    if settings.dane and not local:
        found.append(
            FieldProblem(
                "outbound_security.dane",
                "DANE trusts the AD bit of gateway.dns: name a local DNSSEC-validating "
                "resolver (e.g. unbound on 127.0.0.1); the bit is not protected on the way "
                "from a remote one",
            )
        )
    if not settings.mta_sts:
        found.append(
            FieldProblem(
                "outbound_security.mta_sts",
                "off: the MTA-STS policies of recipient domains are ignored, and mail to "
                "them can be downgraded to plaintext or sent to an impostor's MX",
            )
        )
    return found


CHECKS: tuple[Callable[[GatewayConfig], list[FieldProblem]], ...] = (
    something_to_listen_on,
    unique_names,
    unique_addresses,
    tls_listeners_have_certificates,
    unique_client_hosts,
    unique_sender_domains,
    unique_usernames,
    sender_domains_need_opportunistic_tls,
    secret_files_are_private,
    connector_certificates_exist,
    admin_certificate_exists,
    dkim_keys_usable,
    recipient_validation_domains,
    pop3_connectors,
    outbound_security_domains,
)


def validate(config: GatewayConfig) -> list[FieldProblem]:
    """Every cross-field problem of ``config``; empty when it is usable."""
    return name_objects([problem for check in CHECKS for problem in check(config)], config)


def warnings(config: GatewayConfig) -> list[FieldProblem]:
    """Things that work but that an operator should know about."""
    found = []
    for index, listener in enumerate(config.listeners):
        if listener.security == "implicit-tls" and listener.port == 25:
            found.append(
                FieldProblem(
                    f"listeners[{index}].security",
                    "implicit TLS on port 25 is not RFC-compliant; use port 465 (RFC 8314)",
                )
            )
    for i, connector in enumerate(config.send_connectors):
        target = connector.deliver.smarthost
        if target is not None and target.username is not None and connector.security == "none":
            found.append(
                FieldProblem(
                    f"send_connectors[{i}].security",
                    "the smarthost password would travel unencrypted; use starttls, "
                    "require-starttls or implicit-tls",
                )
            )
    can_tls = any(x.security != "none" for x in config.listeners)
    for i, profile in enumerate(config.connection_profiles):
        if profile.inbound_tls.mandatory and not can_tls:
            found.append(
                FieldProblem(
                    f"connection_profiles[{i}].inbound_tls.mandatory",
                    "no listener offers TLS, so these clients can never send mail",
                )
            )
        if profile.smtp_auth.enabled and not profile.smtp_auth.credentials:
            found.append(
                FieldProblem(f"connection_profiles[{i}].smtp_auth", "enabled without credentials")
            )
    found += _sender_domain_relay_warnings(config)
    found += _virus_warnings(config)
    found += _pop3_warnings(config)
    found += _outbound_security_warnings(config)
    return name_objects(found + _admin_warnings(config), config)


def _sender_domain_relay_warnings(config: GatewayConfig) -> list[FieldProblem]:
    """A sender domain selects a profile only for its inbound TLS requirement, so
    the profile's relay is never granted to those senders."""
    found = []
    for i, profile in enumerate(config.connection_profiles):
        if not profile.sender_domains or profile.relay == "none":
            continue
        users = profile.smtp_auth.enabled and profile.smtp_auth.credentials
        reach = (
            "it applies only to the clients in client_hosts and to this profile's users"
            if profile.client_hosts or users
            else "this profile has no client_hosts and no users, so it applies to no one"
        )
        found.append(
            FieldProblem(
                f"connection_profiles[{i}].relay",
                f"relay {profile.relay} is never granted by sender_domains, which only "
                f"require inbound TLS; {reach}",
            )
        )
    return found


def _virus_warnings(config: GatewayConfig) -> list[FieldProblem]:
    """Mail that virus scanning lets through unchecked (marked, never as clean)."""
    virus = config.virus
    if not virus.clamd:
        return []
    found = []
    if virus.fail == "open":
        found.append(
            FieldProblem(
                "virus.fail",
                "while clamd is down, messages are accepted unchecked "
                "(X-Virus-Status: unchecked); closed answers 451 instead",
            )
        )
    if virus.over_limit == "accept" and virus.max_size < config.limits.max_message_size:
        found.append(
            FieldProblem(
                "virus.max_size",
                f"messages between {virus.max_size} and limits.max_message_size "
                f"({config.limits.max_message_size}) octets are accepted unchecked "
                "(over_limit: accept)",
            )
        )
    return found


def _admin_warnings(config: GatewayConfig) -> list[FieldProblem]:
    return _metrics_warnings(config) + _plain_admin_warnings(config)


def _metrics_warnings(config: GatewayConfig) -> list[FieldProblem]:
    """``admin.metrics_public`` on an address others reach: say what it shows."""
    if not config.admin.listen or not config.admin.metrics_public:
        return []
    if ipaddress.ip_address(parse_listen_address(config.admin.listen)[0]).is_loopback:
        return []
    return [
        FieldProblem(
            "admin.metrics_public",
            "/metrics answers anyone who reaches admin.listen without a token: listener, "
            "profile and connector names, queue sizes and traffic volumes; allow only your "
            "monitoring to reach it",
        )
    ]


def _plain_admin_warnings(config: GatewayConfig) -> list[FieldProblem]:
    if not config.admin.listen or config.admin.certificate is not None:
        return []
    host = parse_listen_address(config.admin.listen)[0]
    if ipaddress.ip_address(host).is_loopback:
        return []
    return [
        FieldProblem(
            "admin.listen",
            "the API and the console speak plain HTTP off loopback, so tokens, passwords "
            "and session cookies would cross the network in clear; set admin.certificate "
            "to serve HTTPS, or keep it on loopback",
        )
    ]
