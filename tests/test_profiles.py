"""Connection profiles: the config model, its checks, and matching (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from smtpgate.config.load import notices, parse_config
from smtpgate.config.schema import convert_wildcard
from smtpgate.errors import ConfigError
from smtpgate.policy.profile import ProfileIndex, match_profile, match_sender_domain


def _config(*profiles: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "mx", "address": "127.0.0.1:0", "security": "none"}],
        "connection_profiles": list(profiles),
        **extra,
    }


def _problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    return [str(p) for p in caught.value.problems]


INDEX = ProfileIndex(
    parse_config(
        _config(
            {"name": "lan", "client_hosts": ["10.0.0.0/8"], "relay": "restricted-internal"},
            {
                "name": "exchange",
                "client_hosts": ["10.0.0.0/24", "exch1.corp.example"],
                "relay": "full",
            },
            {"name": "one-host", "client_hosts": ["10.0.0.5"], "relay": "blocked"},
            {
                "name": "v6",
                "client_hosts": ["2001:db8::/32", "::1"],
                "relay": "restricted-external",
            },
            {
                "name": "partner",
                "client_hosts": ["mx.partner.example"],
                "sender_domains": ["partner.example"],
                "relay": "restricted-external",
                "inbound_tls": {"mandatory": True},
            },
            default_profile={"relay": "none"},
        )
    )
)


@pytest.mark.parametrize(
    ("ip", "names", "profile", "step"),
    [
        ("10.0.0.5", [], "one-host", "client-ip"),  # an exact address beats every range
        ("10.0.0.6", [], "exchange", "client-ip"),  # /24 beats /8
        ("10.9.9.9", [], "lan", "client-ip"),
        ("::ffff:10.0.0.6", [], "exchange", "client-ip"),  # IPv4-mapped IPv6 is IPv4
        ("2001:db8:1::1", [], "v6", "client-ip"),
        ("::1", [], "v6", "client-ip"),
        ("192.0.2.7", ["exch1.corp.example"], "exchange", "host-name"),
        ("192.0.2.7", ["EXCH1.Corp.Example."], "exchange", "host-name"),
        ("10.9.9.9", ["exch1.corp.example"], "lan", "client-ip"),  # the IP comes first
        ("192.0.2.7", [], "default", "default"),  # a name that did not confirm: none given
        ("192.0.2.7", ["other.example"], "default", "default"),
        ("not-an-ip", [], "default", "default"),
    ],
)
def test_match_profile_order(ip: str, names: list[str], profile: str, step: str) -> None:
    match = match_profile(INDEX, ip, names)
    assert (match.profile.name, match.step) == (profile, step)
    assert match.reason()


def test_sender_domain_selects_a_profile_only_for_tls() -> None:
    match = match_sender_domain(INDEX, "partner.example")
    assert match is not None
    assert match.profile.mandatory_tls
    assert match_sender_domain(INDEX, "other.example") is None
    assert INDEX.uses_host_names


@pytest.mark.parametrize(
    ("wildcard", "cidr"),
    [
        ("10.100.80.*", "10.100.80.0/24"),
        ("10.100.*.*", "10.100.0.0/16"),
        ("10.*.*.*", "10.0.0.0/8"),
        ("10.*.80.*", None),
        ("*.*.*.*", None),
        ("10.100.80", None),
        ("mail.*.example", None),
    ],
)
def test_legacy_wildcards(wildcard: str, cidr: str | None) -> None:
    assert convert_wildcard(wildcard) == cidr


def test_wildcards_are_converted_with_a_notice() -> None:
    document = _config({"name": "lan", "client_hosts": ["10.100.80.*", "10.101.*.*"]})
    config = parse_config(document)
    assert config.connection_profiles[0].client_hosts == ["10.100.80.0/24", "10.101.0.0/16"]
    assert [str(n) for n in notices(document)] == [
        "connection_profiles[0].client_hosts[0]: legacy wildcard 10.100.80.* converted to "
        "10.100.80.0/24",
        "connection_profiles[0].client_hosts[1]: legacy wildcard 10.101.*.* converted to "
        "10.101.0.0/16",
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.1/24", "has host bits set"),
        ("10.0.0.256", "is not an IP address"),
        ("10.*.80.*", "wildcards are only allowed as whole trailing octets"),
        ("bad_host..example", "neither an IP address"),
        ("2001:db8::/129", "is not a CIDR range"),
    ],
)
def test_bad_client_hosts_name_the_entry(entry: str, message: str) -> None:
    problems = _problems(_config({"name": "p", "client_hosts": ["10.1.1.1", entry]}))
    assert len(problems) == 1
    assert problems[0].startswith("connection_profiles[0].client_hosts[1]: ")
    assert message in problems[0]


def test_duplicate_entries_within_and_across_profiles() -> None:
    problems = _problems(
        _config(
            {"name": "a", "client_hosts": ["10.0.0.0/24", "10.0.0.0/24", "Mail.Example.com"]},
            {"name": "b", "client_hosts": ["10.100.80.*", "mail.example.com", "10.100.80.0/24"]},
            {"name": "b", "client_hosts": ["::1", "0:0::1"]},
        )
    )
    assert "connection_profiles[2].name: duplicate name 'b'" in problems
    joined = "\n".join(problems)
    assert (
        "connection_profiles[0].client_hosts[1]: 10.0.0.0/24 is already listed at "
        "connection_profiles[0].client_hosts[0] (profile 'a')" in joined
    )
    assert (
        "connection_profiles[1].client_hosts[1]: connection profile 'b': mail.example.com "
        "is already listed at connection_profiles[0].client_hosts[2] (profile 'a')" in joined
    )
    assert "connection_profiles[1].client_hosts[2]: 10.100.80.0/24 is already listed" in joined
    assert "connection_profiles[2].client_hosts[1]: ::1 is already listed" in joined


def test_sender_domains_need_opportunistic_tls() -> None:
    problems = _problems(
        _config(
            {"name": "partner", "sender_domains": ["partner.example"]}, tls={"opportunistic": False}
        )
    )
    assert len(problems) == 1
    assert problems[0].startswith("connection_profiles[0].sender_domains: ")
    assert "tls.opportunistic" in problems[0]


def test_user_names_are_unique_across_profiles(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o600)
    cred = {"username": "scanner", "password_file": str(secret)}
    problems = _problems(
        _config(
            {"name": "a", "smtp_auth": {"enabled": True, "credentials": [cred]}},
            {"name": "b", "smtp_auth": {"enabled": True, "credentials": [cred]}},
        )
    )
    assert problems == [
        "connection_profiles[1].smtp_auth.credentials[0].username: connection profile 'b': "
        "user name 'scanner' is already used by profile 'a'; user names are shared by all "
        "connection profiles"
    ]


def test_passwords_must_be_encrypted() -> None:
    problems = _problems(
        _config(
            {
                "name": "a",
                "smtp_auth": {
                    "enabled": True,
                    "credentials": [{"username": "u1", "password": "hunter2"}],
                },
            }
        )
    )
    assert len(problems) == 1
    assert problems[0].startswith(
        "connection_profiles[0].smtp_auth.credentials[0]: connection profile 'a', user 'u1': "
        "password must be encrypted"
    )
    assert "hunter2" not in problems[0]  # a password never appears in an error


def test_password_files_must_exist_and_be_private(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_text("hunter2")
    loose.chmod(0o644)
    problems = _problems(
        _config(
            {
                "name": "a",
                "smtp_auth": {
                    "enabled": True,
                    "credentials": [
                        {"username": "u2", "password_file": str(loose)},
                        {"username": "u3", "password_file": str(tmp_path / "missing")},
                    ],
                },
            }
        )
    )
    assert problems[0] == (
        f"connection_profiles[0].smtp_auth.credentials[0].password_file: "
        f"connection profile 'a', user 'u2': {loose} is readable by other users (mode 0644); "
        f"run: chmod 600 {loose}"
    )
    assert problems[1].startswith(
        "connection_profiles[0].smtp_auth.credentials[1].password_file: "
        "connection profile 'a', user 'u3': cannot read"
    )


def test_unknown_relay_mode_is_refused() -> None:
    problems = _problems(_config({"name": "a", "relay": "open"}))
    assert problems[0].startswith("connection_profiles[0].relay: ")
