"""Which send connector carries a message? (namespaces, roles, cost)

Among connectors that one of this node's gateway roles may use and whose
namespaces match both the sender and the recipient domain, the cheapest wins;
ties go to the connector whose name sorts first, so the choice never depends
on the order of the configuration file. A connector with no roles listed may
be used by every node.

Patterns are domain names with ``*`` (any run of characters, dots included)
and ``?`` (one character), matched case-insensitively. The null sender has
the empty domain, which only ``*`` matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence, Set
from functools import lru_cache

from smtpgate.config.schema import SendConnector
from smtpgate.policy.relay import split_address


@lru_cache(maxsize=4096)
def _pattern(pattern: str) -> re.Pattern[str]:
    parts = (".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern.lower())
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def domain_matches(pattern: str, domain: str) -> bool:
    """``domain_matches("*.example.com", "a.example.com")`` → True."""
    return _pattern(pattern).match(domain.lower()) is not None


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
