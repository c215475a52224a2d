"""Which send connector carries a message? (namespaces, roles, cost)

Among connectors that one of this node's gateway roles may use and whose
namespaces match both the sender and the recipient domain, the cheapest wins;
ties go to the connector whose name sorts first, so the choice never depends
on the order of the configuration file. A connector with no roles listed may
be used by every node.

Patterns are domain names with ``*`` (any run of characters, dots included)
and ``?`` (one character). Pattern and domain are both brought to the normal
form of :mod:`smtpgate.model.domain` (lower case, A-labels, IDNA 2008), so
``*.bücher.example`` matches ``x@sub.xn--bcher-kva.example`` and every other
spelling of it; a label holding a wildcard must be ASCII. A pattern with no
normal form matches nothing. The null sender has the empty domain, which
only ``*`` (and the empty pattern) matches.

Matching is :func:`fnmatch.fnmatchcase`, whose ``*`` and ``?`` are ours. Its
``[...]`` character classes are not: ``[`` is passed as ``[[]`` (a class of
just ``[``, the escape the fnmatch documentation gives), so an address
literal such as ``[192.0.2.1]`` matches itself and nothing else; a lone
``]`` is literal in fnmatch already.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from fnmatch import fnmatchcase
from functools import lru_cache

from smtpgate.config.schema import SendConnector
from smtpgate.model.domain import DomainError, normalise_pattern
from smtpgate.policy.relay import split_address


@lru_cache(maxsize=4096)
def _pattern(pattern: str) -> str | None:
    """The fnmatch form of a namespace pattern, or None when it has no normal form."""
    try:
        return normalise_pattern(pattern).replace("[", "[[]")
    except DomainError:
        return None


@lru_cache(maxsize=4096)
def _domain(domain: str) -> str:
    return split_address(f"@{domain}")[1]


def domain_matches(pattern: str, domain: str) -> bool:
    """``domain_matches("*.Bücher.example", "a.xn--bcher-kva.example")`` → True.

    ``domain`` is normalised the way :func:`split_address` does it.
    """
    compiled = _pattern(pattern)
    return compiled is not None and fnmatchcase(_domain(domain), compiled)


def connector_applies(
    connector: SendConnector, roles: Set[str], sender_domain: str, recipient_domain: str
) -> bool:
    if connector.roles and roles.isdisjoint(connector.roles):
        return False
    return any(
        domain_matches(ns.sender, sender_domain) and domain_matches(ns.recipient, recipient_domain)
        for ns in connector.namespaces
    )


def select_connector(
    connectors: Sequence[SendConnector],
    roles: Set[str],
    sender_domain: str,
    recipient_domain: str,
) -> SendConnector | None:
    """The cheapest applicable connector (ties: name order), or None."""
    candidates = [
        c for c in connectors if connector_applies(c, roles, sender_domain, recipient_domain)
    ]
    return min(candidates, key=lambda c: (c.cost, c.name), default=None)


def route(
    connectors: Sequence[SendConnector],
    roles: Set[str],
    sender: str,
    recipient: str,
    exclude: Set[str] = frozenset(),
) -> SendConnector | None:
    """The connector for ``sender`` → ``recipient`` (addresses), skipping the
    connectors named in ``exclude`` (already tried, for failover)."""
    usable = [c for c in connectors if c.name not in exclude] if exclude else connectors
    sender_domain = split_address(sender)[1] if sender else ""
    return select_connector(usable, roles, sender_domain, split_address(recipient)[1])
