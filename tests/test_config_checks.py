"""Configuration checks that name the object and the value: certificate pairs and
expiry, duplicate client hosts written differently, rejected values, PKCS#12
without a PIN, YAML syntax, sender domains with relay, and secret files.

In-process, on real files; ``tests/integration/test_config_check_cli.py``
shows the same messages as ``smtpgate config check`` prints them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from smtpgate.admin.services import ConfigService
from smtpgate.config.load import parse_config, read_document
from smtpgate.config.secret import read_secret
from smtpgate.config.store import ConfigStore
from smtpgate.config.validate import warnings
from smtpgate.errors import ConfigError
from smtpgate.policy.profile import ProfileIndex, match_profile
from smtpgate.snapshot import Snapshot
from smtpgate.tls.certificates import check_configured, load_configured
from tests.certificates import dated, issued, private

LISTENER = {"name": "mx", "address": "127.0.0.1:2525", "security": "none"}


@dataclass
class Pair:
    cert: Path
    key: Path


def _issued(ca: trustme.CA, directory: Path, name: str) -> Pair:
    return Pair(*issued(ca, directory, name))


def _dated(directory: Path, name: str, not_after: dt.datetime) -> Pair:
    """A self-signed certificate that ends at ``not_after`` (past or future)."""
    return Pair(*dated(directory, name, not_after))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _document(data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"gateway": {"hostname": "gw.test", "data_dir": str(data_dir)}, **extra}


def _config(tmp_path: Path, **extra: Any) -> Any:
    return parse_config(_document(tmp_path / "var", listeners=[LISTENER], **extra))


def _problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    return [str(p) for p in caught.value.problems]


# -- item 4: the key must be the certificate's; expiry -------------------------


def test_a_key_of_another_certificate_is_refused_naming_both_files(
    tmp_path: Path, ca: trustme.CA
) -> None:
    gw, other = _issued(ca, tmp_path, "gw"), _issued(ca, tmp_path, "other")
    config = _config(
        tmp_path, certificates=[{"name": "gw", "cert": str(gw.cert), "key": str(other.key)}]
    )
    with pytest.raises(ConfigError) as caught:
        load_configured(config)
    assert [str(p) for p in caught.value.problems] == [
        f"certificates[0].key: certificate 'gw': the key in {other.key} does not belong to the "
        f"certificate in {gw.cert} (their public keys differ): name the key that was issued with it"
    ]


def test_a_key_inside_the_pem_must_match_too(tmp_path: Path, ca: trustme.CA) -> None:
    gw, other = _issued(ca, tmp_path, "gw"), _issued(ca, tmp_path, "other")
    both = private(tmp_path / "both.pem", gw.cert.read_bytes() + other.key.read_bytes())
    config = _config(tmp_path, certificates=[{"name": "gw", "cert": str(both)}])
    with pytest.raises(ConfigError, match=r"^certificates\[0\]\.cert: certificate 'gw': the key"):
        load_configured(config)


def test_a_matching_pair_loads(tmp_path: Path, ca: trustme.CA) -> None:
    gw = _issued(ca, tmp_path, "gw")
    config = _config(
        tmp_path, certificates=[{"name": "gw", "cert": str(gw.cert), "key": str(gw.key)}]
    )
    assert check_configured(config) == []


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    ended = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
    old = _dated(tmp_path, "old", ended)
    config = _config(
        tmp_path, certificates=[{"name": "old", "cert": str(old.cert), "key": str(old.key)}]
    )
    with pytest.raises(ConfigError) as caught:
        check_configured(config)
    assert [str(p) for p in caught.value.problems] == [
        f"certificates[0].cert: certificate 'old': the certificate in {old.cert} expired on "
        "2024-03-01 12:00 UTC: renew it"
    ]
    # serve keeps mail flowing on an expired certificate, and says so
    assert [p.path for p in check_configured(config, refuse_expired=False)] == [
        "certificates[0].cert"
    ]


def test_a_certificate_expiring_within_30_days_is_a_warning(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ends = now + dt.timedelta(days=12, hours=1)
    soon = _dated(tmp_path, "soon", ends)
    config = _config(
        tmp_path, certificates=[{"name": "soon", "cert": str(soon.cert), "key": str(soon.key)}]
    )
    assert [str(w) for w in check_configured(config, now=now)] == [
        f"certificates[0].cert: certificate 'soon': the certificate in {soon.cert} expires on "
        f"{ends:%Y-%m-%d %H:%M} UTC, in 12 days: renew it"
    ]


def test_validate_and_apply_refuse_a_mismatched_pair_and_an_expired_certificate(
    tmp_path: Path, ca: trustme.CA
) -> None:
    data_dir = tmp_path / "var"
    service = ConfigService(ConfigStore.open(data_dir), data_dir)
    service.adopt_file(parse_config(_document(data_dir, listeners=[LISTENER])), "file:gw.yaml")
    gw, other = _issued(ca, tmp_path, "gw"), _issued(ca, tmp_path, "other")
    old = _dated(tmp_path, "old", dt.datetime(2024, 3, 1, tzinfo=dt.UTC))
    certificates = [
        {"name": "gw", "cert": str(gw.cert), "key": str(other.key)},
        {"name": "old", "cert": str(old.cert), "key": str(old.key)},
    ]
    service.stage(_document(data_dir, listeners=[LISTENER], certificates=certificates), "t", "x")
    problems = service.validate()
    assert [p.path for p in problems] == ["certificates[0].key"]
    assert problems[0].message.startswith(f"certificate 'gw': the key in {other.key} does not")
    with pytest.raises(ConfigError):
        service.apply("t")
    certificates[0]["key"] = str(gw.key)
    service.stage(
        _document(data_dir, listeners=[LISTENER], certificates=certificates), "t", "x", force=True
    )
    assert [p.message.split(":")[0] for p in service.validate()] == ["certificate 'old'"]
    with pytest.raises(ConfigError):
        service.apply("t")
    assert service.store.applied_number() == 1


# -- item 5: duplicates written differently ------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "written"),
    [
        ("127.0.0.2", "127.0.0.2/32", "127.0.0.2/32"),
        ("127.0.0.2", "::ffff:127.0.0.2", "::ffff:7f00:2"),
        ("10.0.0.0/8", "::ffff:10.0.0.0/104", "::ffff:a00:0/104"),
        ("2001:db8::1", "2001:db8::1/128", "2001:db8::1/128"),
    ],
)
def test_the_same_client_host_written_differently_is_a_duplicate(
    first: str, second: str, written: str
) -> None:
    problems = _problems(
        {
            "listeners": [LISTENER],
            "connection_profiles": [
                {"name": "apps", "client_hosts": [first]},
                {"name": "lab", "client_hosts": [second]},
            ],
        }
    )
    assert problems == [
        f"connection_profiles[1].client_hosts[0]: connection profile 'lab': {written} is "
        f"already listed as {first} at connection_profiles[0].client_hosts[0] (profile 'apps')"
    ]


@pytest.mark.parametrize("client", ["10.1.2.3", "::ffff:10.1.2.3"])
@pytest.mark.parametrize("entry", ["::ffff:10.1.2.3", "::ffff:10.1.2.0/120"])
def test_an_ipv4_mapped_entry_matches_the_ipv4_client(
    tmp_path: Path, entry: str, client: str
) -> None:
    config = _config(tmp_path, connection_profiles=[{"name": "lab", "client_hosts": [entry]}])
    found = match_profile(ProfileIndex(config), client)
    assert (found.step, found.profile.name) == ("client-ip", "lab")


# -- item 6: the object's name and the rejected value --------------------------


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (
            {"connection_profiles": [{"name": "lab", "relay": "sometimes"}]},
            "connection_profiles[0].relay: connection profile 'lab': 'sometimes' is not one of "
            "'none', 'full', 'restricted-external', 'restricted-internal' or 'blocked'",
        ),
        (
            {"listeners": [{**LISTENER, "proxy_protocol": "yes"}]},
            "listeners[0].proxy_protocol: listener 'mx': 'yes' should be a valid boolean",
        ),
        (
            {
                "send_connectors": [
                    {"name": "out", "deliver": {"smarthost": {"host": "x", "port": "25"}}}
                ]
            },
            "send_connectors[0].deliver.smarthost.port: send connector 'out': '25' should be "
            "a valid integer",
        ),
        (
            {"certificates": [{"name": "gw"}]},
            "certificates[0]: certificate 'gw': set exactly one of cert (PEM) and pkcs12",
        ),
        (
            {"limits": {"max_connections": 0}},
            "limits.max_connections: 0 should be greater than or equal to 1",
        ),
        (
            {"connection_profiles": [{"name": "lab", "client_hosts": ["10.0.0.1/8"]}]},
            "connection_profiles[0].client_hosts[0]: connection profile 'lab': '10.0.0.1/8' is "
            "not a CIDR range (10.0.0.1/8 has host bits set)",
        ),
    ],
)
def test_problems_name_the_object_and_quote_the_value(
    document: dict[str, Any], problem: str
) -> None:
    assert problem in _problems({"listeners": [LISTENER], **document})


def test_cross_field_problems_name_the_object_too() -> None:
    problems = _problems(
        {
            "listeners": [
                LISTENER,
                {"name": "mx2", "address": "127.0.0.1:2525", "security": "none"},
            ],
            "send_connectors": [
                {"name": "out", "deliver": {"dns": {}}, "client_certificate": "nope"}
            ],
        }
    )
    assert problems == [
        "listeners[1].address: listener 'mx2': 127.0.0.1:2525 is already used by listener 'mx'",
        "send_connectors[0].client_certificate: send connector 'out': no certificate named 'nope'",
    ]


def test_a_rejected_secret_is_never_quoted() -> None:
    credential = {"username": "bob", "password": 123456789}
    problems = _problems(
        {
            "listeners": [LISTENER],
            "connection_profiles": [{"name": "lab", "smtp_auth": {"credentials": [credential]}}],
        }
    )
    assert problems == [
        "connection_profiles[0].smtp_auth.credentials[0].password: connection profile 'lab', "
        "user 'bob': Input should be a valid string"
    ]


# -- item 7: PKCS#12 without a PIN; YAML syntax --------------------------------


def test_a_pkcs12_file_without_a_configured_pin_says_it_needs_one(
    tmp_path: Path, ca: trustme.CA
) -> None:
    gw = _issued(ca, tmp_path, "gw")
    key = serialization.load_pem_private_key(gw.key.read_bytes(), None)
    leaf = x509.load_pem_x509_certificates(gw.cert.read_bytes())[0]
    blob = pkcs12.serialize_key_and_certificates(
        b"gw",
        key,
        leaf,
        None,
        serialization.BestAvailableEncryption(b"1234"),  # type: ignore[arg-type]
    )
    p12 = private(tmp_path / "gw.p12", blob)
    config = _config(tmp_path, certificates=[{"name": "gw", "pkcs12": str(p12)}])
    with pytest.raises(ConfigError) as caught:
        load_configured(config)
    assert [str(p) for p in caught.value.problems] == [
        f"certificates[0].pkcs12: certificate 'gw': {p12} needs a PIN to open: set pin_file "
        "(a 0600 file holding it) or pin (encrypted by `smtpgate credentials encrypt`)"
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "gateway:\n  hostname: gw.test: x\n",
            "YAML syntax error at line 2, column 20: mapping values are not allowed here",
        ),
        (
            "listeners:\n  - name: mx\n   address: x\n",
            "YAML syntax error at line 3, column 4: expected <block end>, but found "
            "'<block mapping start>' (while parsing a block collection that starts at "
            "line 2, column 3)",
        ),
    ],
)
def test_yaml_syntax_errors_keep_the_description(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_document(path)
    assert [str(p) for p in caught.value.problems] == [problem]


# -- item 8: sender domains never grant relay ----------------------------------


def test_sender_domains_with_relay_warn(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        connection_profiles=[
            {"name": "partners", "sender_domains": ["partner.example"], "relay": "full"},
            {
                "name": "office",
                "client_hosts": ["10.0.0.0/8"],
                "sender_domains": ["office.example"],
                "relay": "full",
            },
            {"name": "tls-only", "sender_domains": ["tls.example"]},
        ],
    )
    assert [str(w) for w in warnings(config)] == [
        "connection_profiles[0].relay: connection profile 'partners': relay full is never "
        "granted by sender_domains, which only require inbound TLS; this profile has no "
        "client_hosts and no users, so it applies to no one",
        "connection_profiles[1].relay: connection profile 'office': relay full is never "
        "granted by sender_domains, which only require inbound TLS; it applies only to the "
        "clients in client_hosts and to this profile's users",
    ]


# -- item 25: every secret file is private ------------------------------------


def _loose(path: Path, mode: int = 0o644) -> Path:
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_every_secret_file_must_be_private(tmp_path: Path, ca: trustme.CA, mode: int) -> None:
    gw = _issued(ca, tmp_path, "gw")
    pin, password = _loose(tmp_path / "pin", mode), _loose(tmp_path / "smarthost-pw", mode)
    smarthost = {"host": "relay.example", "username": "gw", "password_file": str(password)}
    p12 = private(tmp_path / "gw.p12", b"not opened")
    problems = _problems(
        _document(
            tmp_path / "var",
            listeners=[LISTENER],
            certificates=[
                {"name": "ok", "cert": str(gw.cert), "key": str(gw.key)},
                {"name": "token", "pkcs12": str(p12), "pin_file": str(pin)},
            ],
            send_connectors=[{"name": "out", "deliver": {"smarthost": smarthost}}],
        )
    )
    assert problems == [
        f"send_connectors[0].deliver.smarthost.password_file: send connector 'out': {password} "
        f"is readable by other users (mode {mode:04o}); run: chmod 600 {password}",
        f"certificates[1].pin_file: certificate 'token': {pin} is readable by other users "
        f"(mode {mode:04o}); run: chmod 600 {pin}",
    ]


def test_secret_files_are_checked_again_when_read(tmp_path: Path) -> None:
    """A file opened after the checks (apply, reload) is refused all the same."""
    password = _loose(tmp_path / "pw")
    with pytest.raises(ConfigError) as caught:
        read_secret(None, password, None, "send_connectors[0].deliver.smarthost.password")
    assert [str(p) for p in caught.value.problems] == [
        f"send_connectors[0].deliver.smarthost.password: {password} is readable by other "
        f"users (mode 0644); run: chmod 600 {password}"
    ]


def test_the_gateway_refuses_a_smarthost_password_file_opened_to_others(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    private(password, b"s3cret\n")
    smarthost = {"host": "relay.example", "username": "gw", "password_file": str(password)}
    config = _config(
        tmp_path, send_connectors=[{"name": "out", "deliver": {"smarthost": smarthost}}]
    )
    password.chmod(0o644)  # after the checks, before the gateway reads it
    with pytest.raises(ConfigError, match=r"is readable by other users \(mode 0644\)"):
        Snapshot.compile(config)


@pytest.mark.parametrize("workers", [0, 65, "2", True])
def test_a_bad_worker_count_is_named(tmp_path: Path, workers: object) -> None:
    document = _document(tmp_path / "var", listeners=[LISTENER])
    document["gateway"]["workers"] = workers
    [problem] = _problems(document)
    assert problem.startswith("gateway.workers: ")


def test_the_worker_count_is_taken_and_defaults_to_none(tmp_path: Path) -> None:
    assert _config(tmp_path).gateway.workers is None  # serve: one per core
    document = _document(tmp_path / "var", listeners=[LISTENER])
    document["gateway"]["workers"] = 4
    assert parse_config(document).gateway.workers == 4
