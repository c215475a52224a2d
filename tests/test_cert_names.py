"""Certificate host-name matching for delivery (RFC 6125 §6.4), on real certificates.

``certificate_matches`` is what delivery uses to check the next hop's name
(``delivery/attempt.py``); the matching itself is service_identity's.
"""

from __future__ import annotations

import datetime as dt

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smtpgate.tls.certificates import certificate_matches
from tests.certificates import cn_only


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _der(ca: trustme.CA, *identities: str, common_name: str | None = None) -> bytes:
    leaf = ca.issue_cert(*identities, common_name=common_name)
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return certificate.public_bytes(serialization.Encoding.DER)


def _cn_only(common_name: str) -> bytes:
    """A certificate without any subjectAltName (trustme always adds some)."""
    certificate, _ = cn_only(common_name, dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    return certificate.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("identities", "names", "matches"),
    [
        (["*.example.com"], ["mx.example.com"], True),
        (["*.example.com"], ["MX.Example.COM."], True),  # case and a trailing dot
        (["*.example.com"], ["a.b.example.com"], False),  # one label only
        (["*.example.com"], ["example.com"], False),
        (["*.example.com"], ["xn--bcher-kva.example.com"], False),  # no wildcard over an A-label
        (["mx.example.com"], ["partner.example", "mx.example.com"], True),  # any of the names
        (["mx.example.com"], ["mx.example.org"], False),
    ],
)
def test_wildcards(ca: trustme.CA, identities: list[str], names: list[str], matches: bool) -> None:
    assert certificate_matches(_der(ca, *identities), names) is matches


@pytest.mark.parametrize(
    ("identity", "name"),
    [
        ("bücher.example", "bücher.example"),  # U-label on both sides
        ("bücher.example", "xn--bcher-kva.example"),  # the A-label a resolver returns
        ("xn--bcher-kva.example", "bücher.example"),
        ("*.bücher.example", "mx.bücher.example"),
    ],
)
def test_internationalised_names(ca: trustme.CA, identity: str, name: str) -> None:
    assert certificate_matches(_der(ca, identity), [name])


def test_an_idn_does_not_match_a_different_idn(ca: trustme.CA) -> None:
    assert not certificate_matches(_der(ca, "bücher.example"), ["bucher.example"])


def test_subject_alt_names_win_over_the_common_name(ca: trustme.CA) -> None:
    der = _der(ca, "mx.example.com", common_name="legacy.example.com")
    assert certificate_matches(der, ["mx.example.com"])
    assert not certificate_matches(der, ["legacy.example.com"])


def test_the_common_name_counts_only_without_subject_alt_names() -> None:
    assert certificate_matches(_cn_only("mx.example.com"), ["mx.example.com"])
    assert not certificate_matches(_cn_only("mx.example.com"), ["other.example.com"])


@pytest.mark.parametrize(
    ("identity", "name", "matches"),
    [
        ("192.0.2.25", "192.0.2.25", True),  # a smarthost configured by address
        ("2001:db8::25", "2001:db8:0::25", True),  # compared as addresses, not text
        ("192.0.2.25", "192.0.2.26", False),
        ("mx.example.com", "192.0.2.25", False),
        ("192.0.2.25", "mx.example.com", False),
    ],
)
def test_ip_addresses(ca: trustme.CA, identity: str, name: str, matches: bool) -> None:
    assert certificate_matches(_der(ca, identity), [name]) is matches


def test_an_unusable_name_or_pattern_is_no_match(ca: trustme.CA) -> None:
    assert not certificate_matches(_der(ca, "mx.example.com"), ["", "bad name!"])
    assert not certificate_matches(_cn_only("*.com"), ["example.com"])
