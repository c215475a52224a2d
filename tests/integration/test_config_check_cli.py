"""What ``smtpgate config check`` (and ``serve``) print for the problems of issue 10:
a real process on a real file, the exact sentences an administrator reads."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smtpgate.config.store import ConfigStore
from tests.certificates import dated, issued, private
from tests.conftest import SMTPGATE, base_config, merge


def _tls(certificate: dict[str, Any]) -> dict[str, Any]:
    listener = {"name": "smtps", "address": "127.0.0.1:0", "security": "implicit-tls"}
    return {
        "listeners": [{**listener, "certificate": "gw"}],
        "certificates": [{"name": "gw", **certificate}],
    }


def _write(tmp_path: Path, extra: dict[str, Any] | str) -> Path:
    path = tmp_path / "gateway.yaml"
    if isinstance(extra, str):
        path.write_text(extra)
    else:
        path.write_text(yaml.safe_dump(merge(base_config(tmp_path / "var", 2526), extra)))
    return path


def _run(*argv: str, code: int) -> list[str]:
    done = subprocess.run(
        [SMTPGATE, *argv], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return (done.stdout + done.stderr).splitlines()


def _check(path: Path, code: int) -> list[str]:
    return _run("config", "check", "--config", str(path), code=code)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_a_key_of_another_certificate_is_named_and_serve_stores_nothing(
    tmp_path: Path, ca: trustme.CA
) -> None:
    cert, _ = issued(ca, tmp_path, "gw")
    _, other_key = issued(ca, tmp_path, "other")
    path = _write(tmp_path, _tls({"cert": str(cert), "key": str(other_key)}))
    problem = (
        f"  - certificates[0].key: certificate 'gw': the key in {other_key} does not belong "
        f"to the certificate in {cert} (their public keys differ): name the key that was "
        "issued with it"
    )
    assert problem in _check(path, code=1)
    assert problem in _run("serve", "--config", str(path), code=1)
    assert ConfigStore.open(tmp_path / "var").applied_number() is None  # not stored


def test_expired_certificates_are_refused_and_expiring_ones_warned(
    tmp_path: Path,
) -> None:
    ended = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
    cert, key = dated(tmp_path, "old", ended)
    out = _check(_write(tmp_path, _tls({"cert": str(cert), "key": str(key)})), code=1)
    assert (
        f"  - certificates[0].cert: certificate 'gw': the certificate in {cert} expired on "
        "2024-03-01 12:00 UTC: renew it"
    ) in out

    ends = dt.datetime.now(dt.UTC) + dt.timedelta(days=20, hours=1)
    cert, key = dated(tmp_path, "soon", ends)
    out = _check(_write(tmp_path, _tls({"cert": str(cert), "key": str(key)})), code=0)
    assert (
        f"warning: certificates[0].cert: certificate 'gw': the certificate in {cert} expires "
        f"on {ends:%Y-%m-%d %H:%M} UTC, in 20 days: renew it"
    ) in out


def test_a_pkcs12_file_without_a_pin_says_it_needs_one(tmp_path: Path, ca: trustme.CA) -> None:
    cert, key_file = issued(ca, tmp_path, "gw")
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    blob = serialization.pkcs12.serialize_key_and_certificates(
        b"gw",
        key,  # type: ignore[arg-type]
        leaf,
        None,
        serialization.BestAvailableEncryption(b"1234"),
    )
    p12 = private(tmp_path / "gw.p12", blob)
    out = _check(_write(tmp_path, _tls({"pkcs12": str(p12)})), code=1)
    assert (
        f"  - certificates[0].pkcs12: certificate 'gw': {p12} needs a PIN to open: set "
        "pin_file (a 0600 file holding it) or pin (encrypted by `smtpgate credentials encrypt`)"
    ) in out


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=oct)
def test_pin_and_smarthost_password_files_must_be_private(
    tmp_path: Path, ca: trustme.CA, mode: int
) -> None:
    shown = f"{mode:04o}"
    cert, key_file = issued(ca, tmp_path, "gw")
    pin = private(tmp_path / "pin", b"1234\n", mode)
    password = private(tmp_path / "relay-password", b"s3cret\n", mode)
    p12 = private(tmp_path / "token.p12", b"never opened")
    extra = merge(
        _tls({"cert": str(cert), "key": str(key_file)}),
        {"send_connectors": [{"name": "relay", "deliver": {"smarthost": {"host": "relay.test"}}}]},
    )
    extra["certificates"].append({"name": "token", "pkcs12": str(p12), "pin_file": str(pin)})
    extra["send_connectors"][0]["deliver"]["smarthost"].update(
        {"username": "gw", "password_file": str(password)}
    )
    extra["send_connectors"][0]["security"] = "require-starttls"
    out = _check(_write(tmp_path, extra), code=1)
    assert out[1:] == [
        f"  - send_connectors[0].deliver.smarthost.password_file: send connector 'relay': "
        f"{password} is readable by other users (mode {shown}); run: chmod 600 {password}",
        f"  - certificates[1].pin_file: certificate 'token': {pin} is readable by other "
        f"users (mode {shown}); run: chmod 600 {pin}",
    ]


def test_problems_name_the_profile_and_quote_the_value(tmp_path: Path) -> None:
    extra = {
        "connection_profiles": [
            {"name": "apps", "client_hosts": ["127.0.0.2"]},
            {"name": "lab", "client_hosts": ["::ffff:127.0.0.2"], "relay": "sometimes"},
            {"name": "lab2", "client_hosts": ["127.0.0.2/32"]},
        ]
    }
    out = _check(_write(tmp_path, extra), code=1)
    assert out[1:] == [
        "  - connection_profiles[1].relay: connection profile 'lab': 'sometimes' is not one of "
        "'none', 'full', 'restricted-external', 'restricted-internal' or 'blocked'",
    ]
    extra["connection_profiles"][1]["relay"] = "none"
    out = _check(_write(tmp_path, extra), code=1)
    assert out[1:] == [
        "  - connection_profiles[1].client_hosts[0]: connection profile 'lab': ::ffff:7f00:2 "
        "is already listed as 127.0.0.2 at connection_profiles[0].client_hosts[0] "
        "(profile 'apps')",
        "  - connection_profiles[2].client_hosts[0]: connection profile 'lab2': 127.0.0.2/32 "
        "is already listed as 127.0.0.2 at connection_profiles[0].client_hosts[0] "
        "(profile 'apps')",
    ]


def test_yaml_syntax_errors_say_what_is_wrong(tmp_path: Path) -> None:
    out = _check(_write(tmp_path, "gateway:\n  hostname: gw.test: x\n"), code=1)
    assert out[1:] == [
        "  - YAML syntax error at line 2, column 20: mapping values are not allowed here"
    ]


def test_sender_domains_with_relay_are_a_warning(tmp_path: Path) -> None:
    profile = {"name": "partners", "sender_domains": ["partner.example"], "relay": "full"}
    out = _check(_write(tmp_path, {"connection_profiles": [profile]}), code=0)
    assert (
        "warning: connection_profiles[0].relay: connection profile 'partners': relay full is "
        "never granted by sender_domains, which only require inbound TLS; this profile has "
        "no client_hosts and no users, so it applies to no one"
    ) in out
