"""Table tests for the one domain normal form (``smtpgate.model.domain``).

IDNA 2008 with UTS #46 mapping (nontransitional): what it maps, what it keeps
apart that IDNA 2003 folded together, and what it refuses.
"""

# ruff: noqa: RUF001 - fullwidth letters and other confusables are the test data

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.model.domain import DomainError, normalise_domain, normalise_pattern


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),  # upper case
        ("ＥＸＡＭＰＬＥ.com", "example.com"),  # fullwidth letters
        ("ｅｘａｍｐｌｅ．ｃｏｍ", "example.com"),  # fullwidth full stop U+FF0E
        ("example。com", "example.com"),  # ideographic full stop U+3002
        ("example｡com", "example.com"),  # halfwidth ideographic full stop U+FF61
        ("exam\u00adple.com", "example.com"),  # soft hyphen: mapped away
        ("faß.example", "xn--fa-hia.example"),  # IDNA 2008: ß is its own letter
        ("fass.example", "fass.example"),
        ("straße.example", "xn--strae-oqa.example"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("bu\u0308cher.example", "xn--bcher-kva.example"),  # NFD: composed by UTS #46
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),  # an A-label, any case
        ("xn--fa-hia.example", "xn--fa-hia.example"),
        ("公司.example", "xn--55qx5d.example"),
        ("my_host.example", "my_host.example"),  # "_" kept in ASCII labels
        ("ab--cd.example", "ab--cd.example"),  # ASCII labels keep their old rules
        ("123.example", "123.example"),
        ("a-b.example", "a-b.example"),
        ("x" * 63 + ".example", "x" * 63 + ".example"),
    ],
)
def test_normal_form(text: str, normal: str) -> None:
    assert normalise_domain(text) == normal
    assert normalise_domain(normal) == normal  # the normal form is a fixed point


def test_idna2008_keeps_eszett_apart_from_ss() -> None:
    # str.encode("idna") (IDNA 2003) made both "fass.example".
    assert normalise_domain("faß.example") != normalise_domain("fass.example")
    assert normalise_domain("straße.example") != normalise_domain("strasse.example")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty domain"),
        ("a..example", "empty label"),
        (".example", "empty label"),
        ("example.com.", "trailing dot"),
        ("-a.example", "no '-' at either end"),  # RFC 1123 §2.1: no hyphen first
        ("a-.example", "no '-' at either end"),
        ("ex ample.com", "only letters"),
        ("exa!mple.com", "only letters"),
        ("ｅｘａｍｐｌｅ！.com", "only letters"),  # fullwidth "!" maps to "!"
        ("x" * 64 + ".example", "at most 63"),
        ((("x" * 63 + ".") * 4)[:254], "longer than 253"),
        ("xn--.example", "IDNA 2008"),  # no Punycode
        ("xn--a-.example", "IDNA 2008"),  # ends with a hyphen
        ("xn---bbk.example", "IDNA 2008"),  # not the canonical encoding of its U-label
        ("xn--zzzzzzzz.example", "IDNA 2008"),  # not Punycode at all
        ("xn--ls8h.example", "IDNA 2008"),  # decodes to U+1F4A9, disallowed
        ("xn--abc.example", "IDNA 2008"),  # decodes to C1 controls
        ("a\u2764.example", "IDNA 2008"),  # a disallowed code point
        ("-bücher.example", "IDNA 2008"),  # a U-label starting with a hyphen
        ("bü--cher.example", "IDNA 2008"),  # hyphens in positions 3 and 4
        ("bü_cher.example", "IDNA 2008"),  # "_" is not allowed in a U-label
        ("a\u200db.example", "IDNA 2008"),  # ZERO WIDTH JOINER out of context
        ("\u0301a.example", "IDNA 2008"),  # starts with a combining mark
        ("a\u2488com", "UTS #46"),  # DIGIT ONE FULL STOP is disallowed
        ("a\ufffdb.example", "UTS #46"),
    ],
)
def test_refused(text: str, why: str) -> None:
    with pytest.raises(DomainError) as caught:
        normalise_domain(text)
    assert why in caught.value.reason
    assert caught.value.reason.isascii()
    assert caught.value.reason.isprintable()


@pytest.mark.parametrize(
    ("pattern", "normal"),
    [
        ("*", "*"),
        ("", ""),
        ("*.Bücher.example", "*.xn--bcher-kva.example"),
        ("*.ＥＸＡＭＰＬＥ.com", "*.example.com"),
        ("exampl?.COM", "exampl?.com"),
        ("*example.com", "*example.com"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::1]", "[ipv6:2001:db8::1]"),
    ],
)
def test_pattern_normal_form(pattern: str, normal: str) -> None:
    assert normalise_pattern(pattern) == normal


@pytest.mark.parametrize(
    "pattern",
    ["bü*.example", "*..example", "*.example.", "*.a\u2764.example", "ex[a]mple.com", "x*!.com"],
)
def test_pattern_refused(pattern: str) -> None:
    with pytest.raises(DomainError):
        normalise_pattern(pattern)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_normalised_or_refused_never_an_other_error(text: str) -> None:
    try:
        normal = normalise_domain(text)
    except DomainError as exc:
        reason = exc.reason
    else:
        reason = ""
        assert normal.isascii()
        assert normal == normal.lower()
        assert normalise_domain(normal) == normal
    assert reason.isascii()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcxnß-_.*?ü。ＡＢ\u00ad0", max_size=30))
def test_domain_like_text_is_normalised_or_refused(text: str) -> None:
    for function in (normalise_domain, normalise_pattern):
        with contextlib.suppress(DomainError):
            function(text)
