"""Sender authentication's pieces against a real DNS server on loopback:
SPF through our resolver, DMARC policy discovery, alignment and pct, the
Authentication-Results value, forged-field removal, enforcement per profile,
bounded lookups, DKIM signing keys and ``policy explain``."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from smtpgate.config.schema import DnsSettings, GatewayConfig
from smtpgate.config.validate import validate
from smtpgate.content import dkimsign
from smtpgate.content.headers import edit_head
from smtpgate.content.pipeline import MessageFacts
from smtpgate.content.senderauth import (
    BoundedDns,
    DkimResult,
    DmarcResult,
    SenderAuth,
    SpfResult,
    Verdict,
    authenticate,
    check_dmarc,
    check_spf,
    forged_results,
    organizational_domain,
    results_value,
)
from smtpgate.errors import ConfigError
from smtpgate.model.envelope import Envelope
from smtpgate.policy.explain import Facts, explain
from smtpgate.policy.profile import ProfileIndex
from smtpgate.tls.certificates import Loaded
from tests.conftest import SMTPGATE
from tests.dnsserver import start_dns

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
PUBLIC = base64.b64encode(
    KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()
VALUE = f"v=DKIM1; k=rsa; p={PUBLIC}"

RECORDS = {
    ("pass.test", "TXT"): ['"v=spf1 mx include:inc.test -all"'],
    ("pass.test", "MX"): ["10 mx.pass.test."],
    ("mx.pass.test", "A"): ["127.0.0.7"],
    ("inc.test", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
    ("soft.test", "TXT"): ['"v=spf1 ~all"'],
    ("helo.test", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
    ("_dmarc.org.test", "TXT"): ['"v=DMARC1; p=reject; sp=quarantine"'],
    ("_dmarc.strict.test", "TXT"): ['"v=DMARC1; p=reject; adkim=s; aspf=s"'],
    ("_dmarc.sampled.test", "TXT"): ['"v=DMARC1; p=reject; pct=0"'],
    ("_dmarc.twice.test", "TXT"): ['"v=DMARC1; p=reject"', '"v=DMARC1; p=none"'],
    ("_dmarc.other.test", "TXT"): ['"v=spf1 -all"'],
    ("k._domainkey.org.test", "TXT"): [
        " ".join(f'"{VALUE[i : i + 255]}"' for i in range(0, len(VALUE), 255))
    ],
}


@pytest.fixture
async def dns_port() -> AsyncIterator[int]:
    server, port = await start_dns(RECORDS)
    yield port
    assert server.transport is not None
    server.transport.close()


def resolver(port: int, budget: float = 10) -> BoundedDns:
    return BoundedDns(DnsSettings(nameservers=["127.0.0.1"], port=port, timeout=2), budget)


async def test_spf_results_through_our_name_servers(dns_port: int) -> None:
    def run() -> list[SpfResult]:
        dns = resolver(dns_port)
        return [
            check_spf(dns, "127.0.0.1", "a@pass.test", "h.test"),  # via include:
            check_spf(dns, "127.0.0.7", "a@pass.test", "h.test"),  # via mx
            check_spf(dns, "127.0.0.9", "a@pass.test", "h.test"),
            check_spf(dns, "127.0.0.9", "a@soft.test", "h.test"),
            check_spf(dns, "127.0.0.1", "", "helo.test"),  # null sender: HELO
            check_spf(dns, "127.0.0.1", "a@nowhere.test", "h.test"),
        ]

    found = await asyncio.to_thread(run)
    assert [r.result for r in found] == ["pass", "pass", "fail", "softfail", "pass", "none"]
    assert (found[4].identity, found[4].domain) == ("helo", "helo.test")


async def test_dns_that_never_answers_is_a_temperror_within_the_budget() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        started = time.monotonic()
        spf = await asyncio.to_thread(
            check_spf, resolver(port, budget=1.5), "127.0.0.1", "a@pass.test", "h"
        )
        assert spf.result == "temperror"
        assert time.monotonic() - started < 4


def _dkim(result: str, domain: str) -> tuple[DkimResult, ...]:
    return (DkimResult(result, domain, "k"),)


NO_SPF = SpfResult("fail", "elsewhere.test", "mailfrom")


async def test_dmarc_discovery_alignment_and_pct(dns_port: int) -> None:
    def run() -> dict[str, DmarcResult]:
        dns = resolver(dns_port)
        return {
            "relaxed": check_dmarc(
                dns, ["org.test"], NO_SPF, _dkim("pass", "mail.org.test"), False
            ),
            "spf": check_dmarc(
                dns, ["org.test"], SpfResult("pass", "bounce.org.test", "mailfrom"), (), False
            ),
            "sub": check_dmarc(dns, ["news.org.test"], NO_SPF, (), False),
            "strict": check_dmarc(
                dns, ["strict.test"], NO_SPF, _dkim("pass", "a.strict.test"), False
            ),
            "pct": check_dmarc(dns, ["sampled.test"], NO_SPF, (), False),
            "twice": check_dmarc(dns, ["twice.test"], NO_SPF, (), False),
            "not-dmarc": check_dmarc(dns, ["other.test"], NO_SPF, (), False),
            "two-froms": check_dmarc(dns, ["org.test", "x.test"], NO_SPF, (), False),
            "tempfail": check_dmarc(
                dns, ["org.test"], NO_SPF, _dkim("temperror", "org.test"), False
            ),
            "large": check_dmarc(dns, ["org.test"], NO_SPF, (), True),
        }

    r = await asyncio.to_thread(run)
    assert r["relaxed"].result == "pass"
    assert r["spf"].result == "pass"
    assert (r["sub"].result, r["sub"].policy, r["sub"].disposition) == (
        "fail",
        "quarantine",
        "quarantine",
    )  # the organizational domain's sp=
    assert (r["strict"].result, r["strict"].disposition) == ("fail", "reject")
    assert (r["pct"].result, r["pct"].policy, r["pct"].disposition) == (
        "fail",
        "reject",
        "quarantine",
    )
    assert r["twice"].result == "none"
    assert r["not-dmarc"].result == "none"
    assert r["two-froms"].result == "permerror"
    assert (r["tempfail"].result, r["tempfail"].enforceable) == ("temperror", False)
    assert (r["large"].result, r["large"].enforceable) == ("fail", False)


def test_organizational_domain_uses_the_public_suffix_list() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("mail.example.com") == "example.com"


def _facts(sender: str = "a@org.test", profile: str = "default") -> MessageFacts:
    envelope = Envelope(sender, (), helo="h.test", client_ip="127.0.0.9", profile=profile)
    return MessageFacts("Q1", envelope, "gw.test")


async def test_a_signed_message_passes_and_a_large_one_is_not_enforced(dns_port: int) -> None:
    message = b"From: <a@org.test>\r\nTo: <b@example.com>\r\nSubject: s\r\n\r\nbody\r\n"
    signed = dkim.sign(message, b"k", b"org.test", PEM, canonicalize=(b"relaxed", b"relaxed"))
    head = (signed + message).split(b"\r\n\r\n")[0] + b"\r\n"
    settings = DnsSettings(nameservers=["127.0.0.1"], port=dns_port, timeout=2)
    verdict = await asyncio.to_thread(authenticate, settings, 10, _facts(), head, signed + message)
    assert [(d.result, d.domain, d.selector) for d in verdict.dkim] == [("pass", "org.test", "k")]
    assert verdict.dmarc.result == "pass"
    large = await asyncio.to_thread(authenticate, settings, 10, _facts(), head, None)
    assert large.dkim[0].result == "neutral"
    assert (large.dmarc.result, large.dmarc.enforceable) == ("fail", False)
    value = results_value("gw.test", large)
    assert "dkim=neutral (message too large to verify)" in value
    assert "dmarc=fail (p=reject dis=reject; DKIM not verified: too large)" in value


def _config(**extra: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway": {"hostname": "gw.test"},
            "connection_profiles": [
                {"name": "inside", "client_hosts": ["10.0.0.0/8"], "relay": "full"},
                {"name": "lenient", "client_hosts": ["192.0.2.9"], "dmarc_policy": "report"},
            ],
            **extra,
        }
    )


def _failing(disposition: str, enforceable: bool = True) -> Verdict:
    return Verdict(
        SpfResult("fail", "org.test", "mailfrom"),
        (),
        DmarcResult("fail", "org.test", disposition, disposition, enforceable),
    )


def test_enforcement_follows_the_profile() -> None:
    config, scanner = _config(), SenderAuth()
    reject = scanner._decide(_facts(), config, _failing("reject"))
    assert reject.action == "reject"
    assert reject.reply is not None
    assert reject.reply.text() == "550 5.7.1 Message rejected by the DMARC policy of org.test"
    assert scanner._decide(_facts(), config, _failing("quarantine")).action == "quarantine"
    assert scanner._decide(_facts(profile="lenient"), config, _failing("reject")).action == (
        "accept"
    )
    unsure = scanner._decide(_facts(), config, _failing("reject", enforceable=False))
    assert unsure.action == "accept"
    [(name, value)] = reject.headers
    assert name == "Authentication-Results"
    assert value.startswith("gw.test; spf=fail smtp.mailfrom=org.test; dkim=none; dmarc=fail")


def test_forged_results_are_ours_only_and_only_from_outside() -> None:
    config = _config(sender_auth={"authserv_id": "mx.example.com"})
    drop = forged_results(config, internal=False)
    assert drop is not None
    head = (
        b"Authentication-Results: mx.example.com; spf=pass\r\n"
        b"Authentication-Results: (x) MX.Example.COM;\r\n dkim=pass\r\n"
        b"Authentication-Results: mx.example.com.evil; spf=pass\r\n"
        b"Authentication-Results: other.example; spf=pass\r\n"
        b"Subject: s\r\n"
    )
    kept = edit_head(head, drop=drop)
    assert kept.count(b"Authentication-Results") == 2
    assert b"mx.example.com.evil" in kept
    assert b"other.example" in kept
    assert forged_results(config, internal=True) is None
    assert forged_results(_config(sender_auth={"verify": False}), internal=False) is None


def test_a_key_readable_by_others_is_a_config_error(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_bytes(PEM)
    key.chmod(0o644)
    config = _config(
        sender_auth={
            "dkim_signing": [{"domain": "org.test", "selector": "k", "key_file": str(key)}]
        }
    )
    [problem] = [p for p in validate(config) if "dkim" in p.path]
    assert problem.path == "sender_auth.dkim_signing[0].key_file"
    assert "readable by other users" in problem.message
    with pytest.raises(ConfigError, match=r"dkim_signing\[0\]\.key_file"):
        dkimsign.private_key(config.sender_auth.dkim_signing[0], "sender_auth.dkim_signing[0]", {})
    key.chmod(0o600)
    assert not [p for p in validate(config) if "dkim" in p.path]


def test_signing_picks_the_from_domain_and_verifies(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_bytes(PEM)
    key.chmod(0o600)
    config = _config(
        sender_auth={
            "dkim_signing": [
                {"domain": "bounce.test", "selector": "b", "key_file": str(key)},
                {"domain": "org.test", "selector": "k", "key_file": str(key)},
            ]
        }
    )
    message = b"From: A <a@org.test>\r\nTo: b@x.test\r\nSubject: s\r\n\r\nbody\r\n"
    head = message.split(b"\r\n\r\n")[0] + b"\r\n"
    chosen = dkimsign.choose(config, head, "bounces@bounce.test")
    assert chosen is not None
    index, entry = chosen
    assert (index, entry.domain) == (1, "org.test")
    field = dkimsign.signature(message, entry, dkimsign.private_key(entry, "x", {}))
    flat = re.sub(rb"\s", b"", field)
    signed = re.search(rb";h=([^;]+)", flat)
    assert signed is not None
    names = signed.group(1).lower().split(b":")
    assert names.count(b"from") == 2  # signed once more than present
    assert names.count(b"subject") == 2

    def published(name: bytes, timeout: float = 5) -> bytes:
        assert name == b"k._domainkey.org.test."
        return f"v=DKIM1; k=rsa; p={PUBLIC}".encode()

    assert dkim.verify(field + message, dnsfunc=published)
    none = dkimsign.choose(config, b"From: <a@else.test>\r\n", "bounces@bounce.test")
    assert none is not None
    assert none[1].domain == "bounce.test"  # no From entry: the envelope sender's


def test_explain_names_what_sender_authentication_does() -> None:
    config = _config(
        sender_auth={
            "dkim_signing": [{"domain": "org.test", "selector": "k", "certificate": "dkim"}]
        }
    )
    index = ProfileIndex(config)
    outside = explain(config, index, {}, Facts("198.51.100.1", sender="a@x.test")).as_text()
    assert "sender auth:  SPF, DKIM, DMARC verified; DMARC enforce (profile default" in outside
    lenient = explain(config, index, {}, Facts("192.0.2.9", sender="a@x.test")).as_text()
    assert "DMARC report (profile lenient: failures only reported)" in lenient
    inside = explain(config, index, {}, Facts("10.1.1.1", sender="a@org.test")).as_text()
    assert "DKIM-signed as d=org.test s=k" in inside


def test_keygen_writes_a_private_key_once_and_a_parsable_record(tmp_path: Path) -> None:
    command = [SMTPGATE, "dkim", "keygen", "Example.COM", "s1", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    key = tmp_path / "example.com.s1.key"
    assert key.stat().st_mode & 0o777 == 0o600
    record = done.stdout.strip().splitlines()[-1]
    name, _in, _txt, value = record.split(" ", 3)
    assert name == "s1._domainkey.example.com."
    strings = [s.strip('"') for s in value.split(" ")]
    assert all(len(s) <= 255 for s in strings)
    tags = dict(t.strip().split("=", 1) for t in "".join(strings).split(";"))
    assert (tags["v"], tags["k"]) == ("DKIM1", "rsa")
    public = serialization.load_der_public_key(base64.b64decode(tags["p"]))
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    assert public.public_numbers() == private.public_key().public_numbers()
    again = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert again.returncode == 1
    assert "cannot create" in again.stderr


def test_a_certificate_key_signs_too() -> None:
    pkcs8 = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    config = _config(
        sender_auth={"dkim_signing": [{"domain": "org.test", "selector": "k", "certificate": "c"}]}
    )
    entry = config.sender_auth.dkim_signing[0]
    key = dkimsign.private_key(entry, "here", {"c": Loaded("c", [], pkcs8)})
    assert key == PEM  # PKCS#1, as dkimpy reads it
    with pytest.raises(ConfigError, match=r"here\.certificate"):
        dkimsign.private_key(entry, "here", {})
