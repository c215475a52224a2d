"""Outbound TLS policy (pure) and certificate name matching."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smtpgate.config.schema import OutboundTls, SendConnector, TlsSettings
from smtpgate.policy.tls import outbound_tls_policy
from smtpgate.tls.certificates import certificate_matches


def _connector(security: str) -> SendConnector:
    return SendConnector.model_validate(
        {"name": "c", "security": security, "deliver": {"smarthost": {"host": "mx.example"}}}
    )


@pytest.mark.parametrize(
    ("security", "profile", "mandatory", "minimum", "strength", "names"),
    [
        ("starttls", None, False, "TLSv1.2", "high", ()),
        ("require-starttls", None, True, "TLSv1.2", "high", ()),
        ("starttls", OutboundTls(mandatory=True), True, "TLSv1.2", "high", ()),
        ("starttls", OutboundTls(protocols=["TLSv1.3"]), False, "TLSv1.3", "high", ()),
        ("starttls", OutboundTls(protocols=["TLSv1.1", "TLSv1.2"]), False, "TLSv1.2", "high", ()),
        ("starttls", OutboundTls(cipher_strength="medium"), False, "TLSv1.2", "high", ()),
        (
            "starttls",
            OutboundTls(
                validate_certificate=True, match=["hostname", "recipient_domain", "Other.Example"]
            ),
            False,
            "TLSv1.2",
            "high",
            ("mx.example", "partner.example", "other.example"),
        ),
    ],
)
def test_the_stricter_requirement_wins(
    security: str,
    profile: OutboundTls | None,
    mandatory: bool,
    minimum: str,
    strength: str,
    names: tuple[str, ...],
) -> None:
    policy = outbound_tls_policy(
        _connector(security), profile, "profile p", TlsSettings(), "mx.example", "partner.example"
    )
    assert (policy.mandatory, policy.minimum, policy.strength, policy.names) == (
        mandatory,
        minimum,
        strength,
        names,
    )
    assert policy.validate is bool(names)
    assert policy.reasons[0] == f"connector c: security {security}"


def _certificate(cn: str, sans: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("cn", "sans", "names", "matches"),
    [
        ("mx.example", [], ["mx.example"], True),  # CN only when there is no DNS SAN
        ("mx.example", ["other.example"], ["mx.example"], False),  # SANs first: CN ignored
        ("x", ["*.example.com"], ["mx.example.com"], True),
        ("x", ["*.example.com"], ["a.b.example.com"], False),  # one label only
        ("x", ["*.example.com"], ["example.com"], False),
        ("x", ["MX.Example.COM"], ["mx.example.com."], True),
        ("x", ["mx.example"], ["partner.example", "mx.example"], True),
    ],
)
def test_certificate_name_matching(
    cn: str, sans: list[str], names: list[str], matches: bool
) -> None:
    assert certificate_matches(_certificate(cn, sans), names) is matches
