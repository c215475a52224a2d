"""The pure parts of issue 18: MTA-STS records and policies, the outbound policy
table, TLSA matching (every selector and matching type, DANE-EE and DANE-TA)."""

from __future__ import annotations

import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from smtpgate.config.schema import GatewayConfig, OutboundSecurity, SendConnector
from smtpgate.config.validate import validate, warnings
from smtpgate.delivery.dane import parse_tlsa, verify_dane
from smtpgate.delivery.mtasts import StsError, parse_policy, parse_record
from smtpgate.policy.tls import OutboundPolicy, TlsaRecord
from smtpgate.policy.transport import DaneFact, DomainFacts, StsFact, mx_matches, secure_policy


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx.example.com", "MX.example.com.", True),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "a.b.example.com", False),  # one label only (RFC 8461 §4.1)
        ("*.example.com", "example.com", False),
        ("mx.example.com", "mx.example.net", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


def test_the_sts_record_needs_exactly_one_v_stsv1_with_an_id() -> None:
    assert parse_record(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_record(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert parse_record(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: none (§3.1)
    assert parse_record(["v=STSv1; id=not valid!"]) is None
    assert parse_record(["v=STSv1;"]) is None


def test_policy_parsing() -> None:
    text = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    fact = parse_policy(text + "max_age: 604800\r\nextension: ignored\r\n", "id1")
    assert (fact.mode, fact.mx, fact.max_age) == (
        "enforce",
        ("mail.example.com", "*.example.net"),
        604800,
    )
    assert parse_policy(text + "max_age: 9999999999", "x").max_age == 31557600  # capped
    for bad in [
        "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1",
        "version: STSv1\nmode: sometimes\nmx: a\nmax_age: 1",
        "version: STSv1\nmode: enforce\nmax_age: 1",
        "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon",
        "version: STSv1\nmode enforce",
    ]:
        with pytest.raises(StsError):
            parse_policy(bad, "x")


# -- the table ---------------------------------------------------------------------------

BASE = OutboundPolicy(False, False, (), "TLSv1.2", "high", ("connector mx: security starttls",))
ENFORCE = StsFact("enforce", ("mx.example.com",), "1", 86400)
EE = TlsaRecord(3, 1, 1, b"\x01" * 32)
PKIX = TlsaRecord(1, 1, 1, b"\x01" * 32)


def _decide(facts: DomainFacts, host: str = "mx.example.com", **settings: object) -> OutboundPolicy:
    return secure_policy(BASE, OutboundSecurity.model_validate(settings), facts, host)


def test_enforce_requires_a_valid_certificate_for_a_policy_mx() -> None:
    policy = _decide(DomainFacts("example.com", ENFORCE))
    assert (policy.mandatory, policy.validate, policy.names) == (True, True, ("mx.example.com",))
    assert policy.published == "sts"
    assert "MTA-STS enforce (MTA-STS policy id 1)" in policy.reasons[-1]
    other = _decide(DomainFacts("example.com", ENFORCE), "evil.example.net")
    assert other.refusal == "4.7.5 evil.example.net is not in the MTA-STS policy of example.com"


def test_testing_and_none_and_overrides() -> None:
    testing = StsFact("testing", ("mx.example.com",), "1", 86400)
    policy = _decide(DomainFacts("example.com", testing))
    assert (policy.mandatory, policy.testing, policy.published) == (False, True, "sts")
    assert _decide(DomainFacts("example.com", ENFORCE), mta_sts=False) == BASE
    overridden = _decide(
        DomainFacts("example.com", ENFORCE), domains=[{"domain": "example.com", "mta_sts": "none"}]
    )
    assert not overridden.mandatory
    assert "MTA-STS ignored for example.com" in overridden.reasons[-1]


def test_dane_precedes_mta_sts_and_unusable_records_still_mean_tls() -> None:
    dane = {"mx.example.com": DaneFact("secure", (EE,), "_25._tcp.mx.example.com")}
    policy = _decide(DomainFacts("example.com", ENFORCE, dane=dane), dane=True)
    assert (policy.tlsa, policy.validate, policy.mandatory) == ((EE,), False, True)
    assert policy.published == "tlsa"
    assert _decide(DomainFacts("example.com", ENFORCE, dane=dane)).published == "sts"  # DANE off
    pkix = {"mx.example.com": DaneFact("secure", (PKIX,), "_25._tcp.mx.example.com")}
    unusable = _decide(DomainFacts("example.com", None, dane=pkix), dane=True)
    assert (unusable.tlsa, unusable.mandatory) == ((), True)
    failed = {"mx.example.com": DaneFact("failed", (), "_25._tcp.mx.example.com")}
    refused = _decide(DomainFacts("example.com", None, dane=failed), dane=True)
    assert refused.refusal == "4.7.5 the TLSA lookup of _25._tcp.mx.example.com failed (DANE)"


def test_smarthost_delivery_is_not_affected() -> None:
    SendConnector.model_validate({"name": "s", "deliver": {"smarthost": {"host": "relay"}}})
    assert secure_policy(BASE, OutboundSecurity(), None, "relay") == BASE


# -- TLSA matching ------------------------------------------------------------------------


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _spki(der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(der).public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def chain() -> list[bytes]:
    """leaf (mx.example.com) ← intermediate ← root, as a server would send it."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("mx.example.com")
    return [_der(p.bytes()) for p in leaf.cert_chain_pems]


@pytest.mark.parametrize(("selector", "matching"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_dane_ee_every_selector_and_matching_type(
    chain: list[bytes], selector: int, matching: int
) -> None:
    selected = chain[0] if selector == 0 else _spki(chain[0])
    data = {0: selected, 1: hashlib.sha256(selected).digest(), 2: hashlib.sha512(selected).digest()}
    record = TlsaRecord(3, selector, matching, data[matching])
    assert verify_dane(chain, (record,), ("whatever.example",)) == (
        True,
        f"DANE-EE {selector} {matching}",
    )
    flipped = bytes([data[matching][0] ^ 0xFF]) + data[matching][1:]  # never equal to the right one
    wrong = TlsaRecord(3, selector, matching, flipped)
    assert verify_dane(chain, (wrong,), ("mx.example.com",))[0] is False


def test_dane_ta_matches_an_issuer_in_the_chain_and_checks_the_name(chain: list[bytes]) -> None:
    anchor = TlsaRecord(2, 1, 1, hashlib.sha256(_spki(chain[1])).digest())
    assert verify_dane(chain, (anchor,), ("mx.example.com",)) == (True, "DANE-TA 1 1")
    ok, why = verify_dane(chain, (anchor,), ("other.example.com",))
    assert (ok, why) == (False, "the certificate is not issued to other.example.com (DANE-TA)")
    forged = [chain[0], _der(trustme.CA().cert_pem.bytes())]  # an anchor that did not sign
    forged_anchor = TlsaRecord(2, 0, 1, hashlib.sha256(forged[1]).digest())
    assert verify_dane(forged, (forged_anchor,), ("mx.example.com",))[0] is False


def test_tlsa_text() -> None:
    record = parse_tlsa("3 1 1 AB12 CD34")
    assert record == TlsaRecord(3, 1, 1, bytes.fromhex("ab12cd34"))
    assert record.text() == "3 1 1 ab12cd34"
    assert parse_tlsa("3 1 1 zz") is None
    assert parse_tlsa("3 1") is None


# -- config check -------------------------------------------------------------------------


def test_config_check_refuses_a_domain_twice_and_warns_about_a_remote_validating_resolver() -> None:
    parse_config = GatewayConfig.model_validate

    overrides = [{"domain": "Example.NET", "mta_sts": "enforce"}]
    config = parse_config(
        {
            "gateway": {"dns": {"nameservers": ["192.0.2.53"]}},
            "outbound_security": {"dane": True, "mta_sts": False, "domains": overrides * 2},
        }
    )
    assert [(p.path, p.message) for p in validate(config) if "outbound" in p.path] == [
        ("outbound_security.domains[1].domain", "example.net is listed twice")
    ]
    found = {p.path: p.message for p in warnings(config)}
    assert "local DNSSEC-validating resolver" in found["outbound_security.dane"]
    assert "can be downgraded" in found["outbound_security.mta_sts"]
    local = parse_config(
        {"gateway": {"dns": {"nameservers": ["127.0.0.1"]}}, "outbound_security": {"dane": True}}
    )
    assert not [p for p in warnings(local) if p.path.startswith("outbound_security")]
