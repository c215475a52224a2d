"""Every place that compares domains uses the one normal form (IDNA 2008).

Through the existing entry points only (the grammar, the configuration, the
relay and spoofing decisions, namespace patterns), so each of these tests
also ran against the code that used IDNA 2003 and a hand-written matcher.
"""

# ruff: noqa: RUF001 - fullwidth letters and other confusables are the test data

from __future__ import annotations

import pytest

from smtpgate.config.schema import Namespace, SendConnector, normalise_domain
from smtpgate.policy.relay import decide_relay, decide_sender, split_address
from smtpgate.policy.routing import domain_matches, route
from smtpgate.proto.grammar import SyntaxProblem, parse_path

HOSTED = frozenset({"example.com", "fass.example", "strasse.example", "xn--bcher-kva.example"})

# -- the grammar: the address the gateway works with -------------------------------


@pytest.mark.parametrize(
    ("path", "address"),
    [
        ("<alice@ＥＸＡＭＰＬＥ.com>", "alice@example.com"),  # fullwidth
        ("<alice@example。com>", "alice@example.com"),  # U+3002
        ("<alice@exam\u00adple.com>", "alice@example.com"),  # soft hyphen
        ("<Alice@EXAMPLE.COM>", "Alice@example.com"),  # the local part is left alone
        ("<jörg@Bücher.example>", "jörg@xn--bcher-kva.example"),
        ("<victim@faß.example>", "victim@xn--fa-hia.example"),  # not fass.example
        ("<@relay.example:zoë@bücher.example>", "zoë@xn--bcher-kva.example"),
        ('<"a@b"@ｅｘａｍｐｌｅ.com>', '"a@b"@example.com'),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
    ],
)
def test_a_mailbox_comes_back_with_its_domain_in_normal_form(path: str, address: str) -> None:
    assert parse_path(path, sender=False, smtputf8=True)[0] == address
    assert parse_path(path, sender=True, smtputf8=True)[0] == address


@pytest.mark.parametrize(
    ("path", "smtputf8"),
    [
        ("<x@xn--ls8h.example>", False),  # an A-label of a disallowed code point
        ("<x@xn---bbk.example>", False),  # a non-canonical A-label
        ("<x@xn--.example>", False),
        ("<x@-a.example>", False),
        ("<x@a\u2764.example>", True),  # IDNA 2008 refuses U+2764
        ("<x@bü_cher.example>", True),
        ("<x@a\u200db.example>", True),  # a joiner out of context
        ("<x@bü--cher.example>", True),
    ],
)
@pytest.mark.parametrize(("sender", "status"), [(False, "5.1.3"), (True, "5.1.7")])
def test_a_domain_idna2008_refuses_is_a_syntax_error(
    path: str, smtputf8: bool, sender: bool, status: str
) -> None:
    with pytest.raises(SyntaxProblem) as caught:
        parse_path(path, sender=sender, smtputf8=smtputf8)
    reply = caught.value.reply
    assert (reply.code, reply.status) == (501, status)  # RFC 3463 §3.2: X.1.3 / X.1.7
    assert "invalid domain" in reply.text()
    assert reply.to_bytes().isascii()


# -- configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("faß.example", "xn--fa-hia.example"),
        ("ＥＸＡＭＰＬＥ.com", "example.com"),
        (" Bücher.Example ", "xn--bcher-kva.example"),
        ("my_host.example", "my_host.example"),
    ],
)
def test_configured_domains_use_the_same_normal_form(text: str, normal: str) -> None:
    assert normalise_domain(text) == normal


@pytest.mark.parametrize(
    "text", ["-a.example", "a-.example", "xn--ls8h.example", "a\u2764.example"]
)
def test_configured_domains_idna2008_refuses_are_errors(text: str) -> None:
    with pytest.raises(ValueError, match="is not a domain name"):
        normalise_domain(text)


# -- relay and spoofing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipient", "accepted"),
    [
        ("victim@straße.example", False),  # IDNA 2003 made it strasse.example
        ("victim@faß.example", False),
        ("alice@ＥＸＡＭＰＬＥ.com", True),
        ("alice@example。com", True),
        ("alice@exam\u00adple.com", True),
        ("jörg@bücher.example", True),
        ("jörg@xn--bcher-kva.example", True),
        ("x@xn--ls8h.example", False),  # no normal form: hosted by nobody
    ],
)
def test_relay_decides_on_the_normal_form(recipient: str, accepted: bool) -> None:
    assert decide_relay("none", recipient, HOSTED).accepted is accepted


@pytest.mark.parametrize(
    ("sender", "spoofing"),
    [
        ("ceo@ＦＡＳＳ.example", True),
        ("ceo@bücher.example", True),
        ("ceo@faß.example", False),  # another domain, not a spelling of fass.example
        ("ceo@straße.example", False),
    ],
)
def test_spoof_detection_decides_on_the_normal_form(sender: str, spoofing: bool) -> None:
    assert decide_sender("none", sender, HOSTED, spoof_detection=True).accepted is not spoofing


def test_split_address_leaves_a_domain_without_normal_form_as_written() -> None:
    assert split_address("x@XN--LS8H.example") == ("x", "XN--LS8H.example")
    assert split_address("x@[IPv6:2001:DB8::1]") == ("x", "[ipv6:2001:db8::1]")


# -- namespace patterns: fnmatch's * and ?, never its [...] -----------------------------


@pytest.mark.parametrize(
    ("pattern", "domain", "matches"),
    [
        ("*.bücher.example", "sub.xn--bcher-kva.example", True),  # pattern normalised
        ("*.xn--bcher-kva.example", "sub.bücher.example", True),  # domain normalised
        ("*.BÜCHER.example", "a.b.xn--bcher-kva.example", True),
        ("bücher.example", "xn--bcher-kva.example", True),
        ("*.ＥＸＡＭＰＬＥ.com", "sub.example.com", True),
        ("faß.example", "fass.example", False),
        ("fass.example", "faß.example", False),
        ("*", "", True),  # the null sender
        ("", "", True),
        ("", "example.com", False),
        ("*.example.com", "example.com", False),
        ("*example.com", "badexample.com", True),  # "*" is any run, dots included
        ("a?b.example", "a.b.example", True),  # "?" is any one character, a dot too
        ("a?b.example", "ab.example", False),
        ("[192.0.2.1]", "[192.0.2.1]", True),  # "[" is literal, not a class
        ("[192.0.2.1]", "1", False),
        ("[192.0.2.?]", "[192.0.2.7]", True),
        ("[ab].example", "a.example", False),
        ("ex[a]mple.com", "exa.com", False),
        ("ex[!a]mple.com", "exbmple.com", False),
        ("bü*.example", "bücher.example", False),  # no normal form: matches nothing
        ("bü*.example", "bü*.example", False),
    ],
)
def test_namespace_patterns(pattern: str, domain: str, matches: bool) -> None:
    assert domain_matches(pattern, domain) is matches


def test_a_unicode_namespace_routes_its_a_label_recipients() -> None:
    connector = SendConnector.model_validate(
        {
            "name": "books",
            "deliver": {"smarthost": {"host": "127.0.0.1"}},
            "namespaces": [Namespace(sender="*", recipient="*.bücher.example").model_dump()],
        }
    )
    roles = frozenset({"edge"})
    for recipient in (
        "x@sub.xn--bcher-kva.example",
        "x@Sub.Bücher.Example",
        "x@sub.bücher。example",
    ):
        assert route([connector], roles, "a@b.example", recipient) is connector, recipient
    assert route([connector], roles, "a@b.example", "x@sub.bucher.example") is None
