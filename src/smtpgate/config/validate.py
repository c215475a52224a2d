"""Checks that span several fields of a configuration, with the field path.

Each check is a function from the model to a list of problems, so that
``smtpgate config check`` reports every problem at once.
"""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from smtpgate.config.schema import (
    ConnectionProfile,
    GatewayConfig,
    RequireCertificate,
    parse_listen_address,
)
from smtpgate.errors import FieldProblem


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


def _first_places(
    config: GatewayConfig, field: str, values: Callable[[ConnectionProfile], list[str]]
) -> list[FieldProblem]:
    """Entries that appear twice, in one profile or across profiles."""
    seen: dict[str, str] = {}
    problems = []
    for i, profile in enumerate(config.connection_profiles):
        for j, value in enumerate(values(profile)):
            here = f"connection_profiles[{i}].{field}[{j}]"
            key = value.lower()
            if key in seen:
                problems.append(FieldProblem(here, f"{value} is already listed at {seen[key]}"))
            else:
                seen[key] = f"{here} (profile {profile.name!r})"
    return problems


def unique_client_hosts(config: GatewayConfig) -> list[FieldProblem]:
    return _first_places(config, "client_hosts", lambda p: p.client_hosts)


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


def password_files_are_private(config: GatewayConfig) -> list[FieldProblem]:
    problems = []
    for i, profile in enumerate(config.connection_profiles):
        for j, credential in enumerate(profile.smtp_auth.credentials):
            path = credential.password_file
            if path is None:
                continue
            here = f"connection_profiles[{i}].smtp_auth.credentials[{j}].password_file"
            problem = private_file_problem(path)
            if problem:
                problems.append(FieldProblem(here, problem))
    return problems


def private_file_problem(path: Path, what: str = "") -> str | None:
    """Why a secret file is unusable (missing, or readable by others), or None."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path}{what} is readable by other users; run: chmod 600 {path}"
    return None


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


def something_to_listen_on(config: GatewayConfig) -> list[FieldProblem]:
    if not config.listeners:
        return [FieldProblem("listeners", "at least one listener is needed")]
    return []


CHECKS: tuple[Callable[[GatewayConfig], list[FieldProblem]], ...] = (
    something_to_listen_on,
    unique_names,
    unique_addresses,
    tls_listeners_have_certificates,
    unique_client_hosts,
    unique_sender_domains,
    unique_usernames,
    sender_domains_need_opportunistic_tls,
    password_files_are_private,
    connector_certificates_exist,
)


def validate(config: GatewayConfig) -> list[FieldProblem]:
    """Every cross-field problem of ``config``; empty when it is usable."""
    return [problem for check in CHECKS for problem in check(config)]


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
    return found + _admin_warnings(config)


def _admin_warnings(config: GatewayConfig) -> list[FieldProblem]:
    if not config.admin.listen:
        return []
    host = parse_listen_address(config.admin.listen)[0]
    if ipaddress.ip_address(host).is_loopback:
        return []
    return [
        FieldProblem(
            "admin.listen",
            "the API speaks plain HTTP, so tokens would cross the network in clear; "
            "keep it on loopback or put a TLS proxy in front",
        )
    ]
