"""Checks that span several fields of a configuration, with the field path.

Each check is a function from the model to a list of problems, so that
``smtpgate config check`` reports every problem at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from smtpgate.config.schema import GatewayConfig
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
    )


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
    return problems


def something_to_listen_on(config: GatewayConfig) -> list[FieldProblem]:
    if not config.listeners:
        return [FieldProblem("listeners", "at least one listener is needed")]
    return []


CHECKS: tuple[Callable[[GatewayConfig], list[FieldProblem]], ...] = (
    something_to_listen_on,
    unique_names,
    unique_addresses,
    tls_listeners_have_certificates,
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
    return found
