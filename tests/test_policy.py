"""Table tests for the pure policy functions: relay and routing."""

from __future__ import annotations

import pytest

from smtpgate.config.schema import Namespace, SendConnector
from smtpgate.policy.relay import decide_relay, split_address
from smtpgate.policy.routing import domain_matches, select_connector

HOSTED = frozenset({"example.com", "xn--bcher-kva.example"})


@pytest.mark.parametrize(
    ("recipient", "accepted"),
    [
        ("alice@example.com", True),
        ("Alice@EXAMPLE.COM", True),
        ("jörg@bücher.example", True),  # IDNA-normalised
        ("alice@sub.example.com", False),  # subdomains are not hosted unless listed
        ("alice@example.com.evil.example", False),
        ("victim@foreign.example", False),
        ("victim%foreign.example@example.com", False),  # percent hack
        ("foreign.example!victim@example.com", False),  # bang path
        ('"victim@foreign.example"@example.com', False),  # quoted @
        ("alice@[127.0.0.1]", False),  # IP literal
    ],
)
def test_relay_none_accepts_only_hosted_domains(recipient: str, accepted: bool) -> None:
    verdict = decide_relay(recipient, HOSTED)
    assert verdict.accepted is accepted
    if not accepted:
        assert verdict.reply is not None
        assert (verdict.reply.code, verdict.reply.status) == (554, "5.7.1")
    assert verdict.reason


def test_split_address_normalises_the_domain() -> None:
    assert split_address("User@Bücher.Example") == ("User", "xn--bcher-kva.example")


@pytest.mark.parametrize(
    ("pattern", "domain", "matches"),
    [
        ("*", "anything.example", True),
        ("*", "", True),
        ("example.com", "EXAMPLE.com", True),
        ("example.com", "sub.example.com", False),
        ("*.example.com", "sub.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("exampl?.com", "example.com", True),
        ("exampl?.com", "exampl.com", False),
        ("ex[a]mple.com", "exa.com", False),  # brackets are literal, not a class
        ("netatwork.de", "", False),
    ],
)
def test_domain_patterns(pattern: str, domain: str, matches: bool) -> None:
    assert domain_matches(pattern, domain) is matches


def _connector(
    name: str, cost: int, *namespaces: tuple[str, str], roles: list[str] | None = None
) -> SendConnector:
    return SendConnector.model_validate(
        {
            "name": name,
            "cost": cost,
            "roles": roles or [],
            "deliver": {"smarthost": {"host": "127.0.0.1"}},
            "namespaces": [Namespace(sender=s, recipient=r).model_dump() for s, r in namespaces]
            or [{"sender": "*", "recipient": "*"}],
        }
    )


CONNECTORS = [
    _connector("internet", 10),
    _connector("partner", 5, ("example.com", "partner.example")),
    _connector("exchange", 10, ("*", "example.com"), ("*", "*.example.com")),
    _connector("backup", 10, ("*", "example.com")),
    _connector("internal-only", 1, ("*", "*"), roles=["internal"]),
]


@pytest.mark.parametrize(
    ("sender", "recipient", "roles", "expected"),
    [
        ("example.com", "partner.example", {"edge"}, "partner"),  # cheaper namespace match
        ("other.example", "partner.example", {"edge"}, "internet"),  # sender does not match
        ("", "example.com", {"edge"}, "backup"),  # tie on cost 10: name order
        ("x.example", "sub.example.com", {"edge"}, "exchange"),
        ("x.example", "anywhere.example", {"internal"}, "internal-only"),  # role allows it
        ("x.example", "anywhere.example", {"edge"}, "internet"),
    ],
)
def test_select_connector(sender: str, recipient: str, roles: set[str], expected: str) -> None:
    chosen = select_connector(CONNECTORS, frozenset(roles), sender, recipient)
    assert chosen is not None
    assert chosen.name == expected


def test_no_connector_when_nothing_matches() -> None:
    only = [_connector("partner", 5, ("example.com", "partner.example"))]
    assert select_connector(only, frozenset({"edge"}), "example.com", "other.example") is None
