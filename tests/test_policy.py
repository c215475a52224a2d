"""Table tests for the pure policy functions: relay, spoofing, routing, TLS,
and the listener's step at MAIL."""

from __future__ import annotations

import pytest

from smtpgate.config.load import parse_config
from smtpgate.config.schema import Namespace, RelayMode, SendConnector
from smtpgate.policy.profile import Profile, ProfileIndex, ProfileMatch
from smtpgate.policy.relay import (
    decide_connect,
    decide_relay,
    decide_sender,
    relay_rights,
    spam_checked,
    split_address,
)
from smtpgate.policy.routing import domain_matches, select_connector
from smtpgate.policy.session import ListenerFacts, SessionPolicy, decide_listener
from smtpgate.policy.tls import decide_mail_tls, inbound_tls_required

HOSTED = frozenset({"example.com", "xn--bcher-kva.example"})
MODES: tuple[RelayMode, ...] = ("none", "full", "restricted-external", "restricted-internal")

# mode -> (hosted recipient accepted, foreign recipient accepted, spam-checked by default)
RELAY_TABLE: dict[RelayMode, tuple[bool, bool, bool]] = {
    "none": (True, False, True),
    "full": (True, True, False),
    "restricted-external": (True, False, True),
    "restricted-internal": (True, False, False),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("authenticated_as", [None, *MODES])
@pytest.mark.parametrize("recipient", ["alice@example.com", "victim@foreign.example"])
def test_relay_every_mode_hosted_or_foreign_authenticated_or_not(
    mode: RelayMode, authenticated_as: RelayMode | None, recipient: str
) -> None:
    connection = Profile("conn", mode, False)
    auth = Profile("users", authenticated_as, False) if authenticated_as else None
    rights = relay_rights(connection, auth)
    effective = rights.mode
    if authenticated_as is not None and (mode == "full" or authenticated_as == "full"):
        assert effective == "full"
    hosted_ok, foreign_ok, _ = RELAY_TABLE[effective]
    expected = hosted_ok if recipient.endswith("@example.com") else foreign_ok
    verdict = decide_relay(effective, recipient, HOSTED)
    assert verdict.accepted is expected
    if not expected:
        assert verdict.reply is not None
        assert (verdict.reply.code, verdict.reply.status) == (554, "5.7.1")


@pytest.mark.parametrize(
    ("connection", "auth", "effective"),
    [
        ("none", None, "none"),
        ("none", "full", "full"),
        ("full", "none", "full"),  # never less than the connection's own rights
        ("restricted-external", "restricted-internal", "restricted-internal"),
        ("restricted-internal", "restricted-external", "restricted-internal"),
    ],
)
def test_authenticated_sessions_get_the_more_permissive_mode(
    connection: RelayMode, auth: RelayMode | None, effective: RelayMode
) -> None:
    auth_profile = Profile("users", auth, False) if auth else None
    assert relay_rights(Profile("c", connection, False), auth_profile).mode == effective


@pytest.mark.parametrize(
    ("mode", "check_outbound", "checked"),
    [
        ("none", False, True),
        ("restricted-external", False, True),
        ("full", False, False),
        ("restricted-internal", False, False),
        ("full", True, True),
        ("restricted-internal", True, True),
        ("none", True, True),
    ],
)
def test_spam_check_decision(mode: RelayMode, check_outbound: bool, checked: bool) -> None:
    assert spam_checked(mode, check_outbound)[0] is checked


def test_blocked_profile_is_refused_at_connect() -> None:
    verdict = decide_connect(Profile("bad", "blocked", False))
    assert verdict.reply is not None
    assert verdict.reply.text() == "554 5.7.1 Access denied"
    assert decide_connect(Profile("ok", "none", False)).accepted
    assert not decide_relay("blocked", "alice@example.com", HOSTED).accepted


@pytest.mark.parametrize(
    "recipient",
    [
        "victim%foreign.example@example.com",  # percent hack
        "foreign.example!victim@example.com",  # bang path
        '"victim@foreign.example"@example.com',  # quoted @
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_sender_specified_routing_only_for_trusted_modes(recipient: str, mode: RelayMode) -> None:
    trusted = mode in ("full", "restricted-internal")
    assert decide_relay(mode, recipient, HOSTED).accepted is trusted


@pytest.mark.parametrize(
    "recipient",
    [
        "alice@sub.example.com",
        "alice@example.com.evil.example",
        "alice@[127.0.0.1]",
        "alice@[IPv6:::1]",
        "alice@exampl.com",
    ],
)
@pytest.mark.parametrize("mode", ["none", "restricted-external", "restricted-internal"])
def test_nothing_but_a_hosted_domain_passes(recipient: str, mode: RelayMode) -> None:
    assert not decide_relay(mode, recipient, HOSTED).accepted


def test_hosted_domains_match_case_insensitively_and_by_idna() -> None:
    assert decide_relay("none", "Alice@EXAMPLE.COM", HOSTED).accepted
    assert decide_relay("none", "jörg@bücher.example", HOSTED).accepted
    assert split_address("User@Bücher.Example") == ("User", "xn--bcher-kva.example")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spoof_detection", [True, False])
@pytest.mark.parametrize("sender", ["ceo@example.com", "someone@foreign.example", ""])
def test_spoof_detection(mode: RelayMode, spoof_detection: bool, sender: str) -> None:
    verdict = decide_sender(mode, sender, HOSTED, spoof_detection)
    spoofing = sender.endswith("@example.com") and mode in ("none", "restricted-external")
    assert verdict.accepted is not (spoofing and spoof_detection)
    if not verdict.accepted:
        assert verdict.reply is not None
        assert (verdict.reply.code, verdict.reply.status) == (553, "5.7.1")


@pytest.mark.parametrize(
    ("connection_tls", "sender_tls", "tls_active", "accepted"),
    [
        (False, None, False, True),
        (True, None, False, False),
        (True, None, True, True),
        (False, True, False, False),  # the sender domain's profile requires TLS
        (False, False, False, True),
        (False, True, True, True),
    ],
)
def test_inbound_tls_requirement(
    connection_tls: bool, sender_tls: bool | None, tls_active: bool, accepted: bool
) -> None:
    connection = ProfileMatch(Profile("c", "none", connection_tls), "client-ip", "192.0.2.1")
    sender = (
        ProfileMatch(Profile("s", "none", sender_tls), "sender-domain", "partner.example")
        if sender_tls is not None
        else None
    )
    required, why = inbound_tls_required(connection, sender)
    verdict = decide_mail_tls(required, why, tls_active)
    assert verdict.accepted is accepted
    if not accepted:
        assert verdict.reply is not None
        assert verdict.reply.text().startswith("530 5.7.0")


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


MUST = "530 5.7.0 Must issue a STARTTLS command first"
CERTIFICATE = "530 5.7.0 Must issue STARTTLS and present an accepted client certificate first"


@pytest.mark.parametrize(
    ("requires_tls", "certificate_required", "tls_active", "certificate", "reply"),
    [
        (False, False, False, False, None),
        (True, False, False, False, MUST),  # RFC 3207 §4
        (True, False, True, False, None),
        (False, True, False, False, CERTIFICATE),
        (False, True, True, False, CERTIFICATE),  # TLS, but no accepted certificate
        (False, True, True, True, None),
        (True, True, False, False, MUST),  # the listener's TLS comes first
        (True, True, True, False, CERTIFICATE),
        (True, True, True, True, None),
    ],
)
def test_the_listeners_step_at_mail(
    requires_tls: bool,
    certificate_required: bool,
    tls_active: bool,
    certificate: bool,
    reply: str | None,
) -> None:
    listener = ListenerFacts("mx", requires_tls, certificate_required)
    verdict = decide_listener(listener, tls_active=tls_active, client_certificate=certificate)
    assert (verdict.reply.text() if verdict.reply else None) == reply
    assert verdict.reason.startswith("listener mx")


def test_no_listener_demands_nothing() -> None:
    verdict = decide_listener(None, tls_active=False, client_certificate=False)
    assert verdict.accepted


def _session() -> SessionPolicy:
    config = parse_config(
        {
            "hosted_domains": ["example.com"],
            "listeners": [{"name": "mx", "address": "127.0.0.1:0", "security": "none"}],
            "connection_profiles": [
                {
                    "name": "secure",
                    "client_hosts": ["192.0.2.6"],
                    "relay": "none",
                    "inbound_tls": {"mandatory": True},
                }
            ],
            "send_connectors": [{"name": "out", "deliver": {"smarthost": {"host": "192.0.2.1"}}}],
        }
    )
    return SessionPolicy(config, ProfileIndex(config))


def test_session_mail_refuses_first_for_the_listener() -> None:
    session = _session()
    strict = ListenerFacts("strict", requires_tls=True, security="require-starttls")
    session.connect("192.0.2.6", (), strict)  # its profile requires TLS too
    step = session.mail("spoof@example.com", tls_active=False)
    assert step.refusal is step.listener
    assert step.listener.reason == "listener strict: require-starttls: MAIL refused without TLS"
    assert not step.decision.tls.accepted  # the profile's step still says why
    assert session.mail("a@elsewhere.example", tls_active=True).refusal is None


def test_session_mail_without_a_listener_keeps_the_profiles_order() -> None:
    session = _session()
    session.connect("192.0.2.6")
    step = session.mail("a@elsewhere.example", tls_active=False)
    assert step.listener.accepted
    assert step.refusal is step.decision.tls
    session.connect("192.0.2.9", (), ListenerFacts("mx", requires_tls=False, security="none"))
    assert session.mail("a@elsewhere.example", tls_active=False).refusal is None
