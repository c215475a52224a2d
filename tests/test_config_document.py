"""Tables for the pure configuration-document functions: diff, restart needs,
YAML export, and the field edit language shared by the API and the CLI."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from smtpgate.admin import edit
from smtpgate.config.document import (
    LOCAL_MARK,
    diff,
    local_changes,
    merge,
    normalise,
    restart_required,
    split,
    to_yaml,
)
from smtpgate.config.load import parse_config
from smtpgate.errors import AdminError, Conflict, NotFound

BASE: dict[str, Any] = {
    "gateway": {"hostname": "gw.test", "data_dir": "/var/lib/smtpgate"},
    "hosted_domains": ["example.com"],
    "listeners": [{"name": "mx", "address": "127.0.0.1:2525", "security": "none"}],
    "send_connectors": [
        {"name": "out", "deliver": {"smarthost": {"host": "relay.test"}}, "security": "none"}
    ],
    "connection_profiles": [
        {"name": "partner", "client_hosts": ["10.0.0.0/8"], "relay": "restricted-internal"},
        {"name": "apps", "client_hosts": ["192.0.2.1"], "relay": "full"},
    ],
}


def changed(**sections: Any) -> dict[str, Any]:
    return normalise({**BASE, **sections})


def texts(new: dict[str, Any]) -> list[str]:
    return [c.text() for c in diff(normalise(BASE), new)]


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (normalise(BASE), []),
        (
            changed(
                connection_profiles=[
                    {**BASE["connection_profiles"][0], "relay": "restricted-external"},
                    BASE["connection_profiles"][1],
                ]
            ),
            ["connection profile partner: relay restricted-internal → restricted-external"],
        ),
        (  # reordering named objects is not a change
            changed(connection_profiles=list(reversed(BASE["connection_profiles"]))),
            [],
        ),
        (
            changed(connection_profiles=[BASE["connection_profiles"][0]]),
            ["connection profile apps: removed"],
        ),
        (
            changed(
                connection_profiles=[
                    *BASE["connection_profiles"],
                    {"name": "new", "client_hosts": ["198.51.100.0/24"]},
                ]
            ),
            ["connection profile new: added"],
        ),
        (
            changed(hosted_domains=["example.com", "example.net"]),
            ["hosted domains: added example.net"],
        ),
        (
            changed(
                connection_profiles=[
                    {**BASE["connection_profiles"][0], "client_hosts": ["10.1.0.0/16"]},
                    BASE["connection_profiles"][1],
                ]
            ),
            [
                "connection profile partner: client_hosts: removed 10.0.0.0/8",
                "connection profile partner: client_hosts: added 10.1.0.0/16",
            ],
        ),
        (
            changed(tls={"protocols": ["TLSv1.3"]}),
            ["tls: protocols: removed TLSv1.2"],
        ),
        (
            changed(spoof_detection=False),
            ["spoof detection true → false"],
        ),
        (
            changed(listeners=[{"name": "mx", "address": "127.0.0.1:2526", "security": "none"}]),
            ["listener mx: address 127.0.0.1:2525 → 127.0.0.1:2526"],
        ),
    ],
)
def test_diff_speaks_per_object_and_field(new: dict[str, Any], expected: list[str]) -> None:
    assert texts(new) == expected


def test_secrets_never_appear_in_a_diff() -> None:
    secret = "enc:v1:" + "A" * 40
    connector = {
        "name": "out",
        "deliver": {
            "smarthost": {"host": "relay.test", "username": "u", "password": secret},
        },
        "security": "starttls",
    }
    new = changed(send_connectors=[connector])
    text = "\n".join(texts(new))
    dicts = str([c.as_dict() for c in diff(normalise(BASE), new)])
    assert "send connector out: deliver.smarthost.password changed (secret not shown)" in text
    assert secret not in text
    assert secret not in dicts


@pytest.mark.parametrize(
    ("sections", "restart"),
    [
        ({"hosted_domains": ["example.net"]}, []),
        ({"connection_profiles": []}, []),
        ({"spoof_detection": False}, []),
        ({"tls": {"opportunistic": False}}, []),
        ({"queue": {"retry": {"first": "1m"}}}, []),
        ({"tls": {"protocols": ["TLSv1.3"]}}, ["tls.protocols"]),
        ({"limits": {"max_recipients": 10}}, ["limits.max_recipients"]),
        (
            {"listeners": [{"name": "mx", "address": "127.0.0.1:9", "security": "none"}]},
            ["listeners[mx].address"],
        ),
        (
            {"gateway": {"hostname": "other.test", "data_dir": "/var/lib/smtpgate"}},
            ["gateway.hostname"],
        ),
    ],
)
def test_restart_required_names_only_settings_bound_at_start(
    sections: dict[str, Any], restart: list[str]
) -> None:
    assert restart_required(diff(normalise(BASE), changed(**sections))) == restart


def test_yaml_export_is_minimal_and_reads_back_to_the_same_document() -> None:
    document = normalise(BASE)
    text = to_yaml(document)
    assert "max_recipients" not in text  # defaults left out
    assert "hostname: gw.test" in text
    assert normalise(yaml.safe_load(text)) == document


def test_redacted_export_hides_encrypted_secrets() -> None:
    secret = "enc:v1:" + "B" * 40
    profile = {
        "name": "auth",
        "smtp_auth": {"enabled": True, "credentials": [{"username": "a", "password": secret}]},
    }
    document = normalise({**BASE, "connection_profiles": [profile]})
    assert secret in to_yaml(document)  # encrypted, so it may travel with the export
    assert secret not in to_yaml(document, redact=True)
    assert "<redacted>" in to_yaml(document, redact=True)


# -- the edit language -------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        (["relay=full"], {"relay": "full", "client_hosts": ["10.0.0.0/8"]}),
        (["client_hosts+=10.2.0.0/16"], {"client_hosts": ["10.0.0.0/8", "10.2.0.0/16"]}),
        (["client_hosts+=10.0.0.0/8"], {"client_hosts": ["10.0.0.0/8"]}),  # no duplicate
        (["client_hosts-=10.0.0.0/8"], {"client_hosts": []}),
        (["client_hosts=[a, b]"], {"client_hosts": ["a", "b"]}),
        (["inbound_tls.mandatory=true"], {"inbound_tls": {"mandatory": True}}),
        (["notes="], {"notes": ""}),
        (["notes=a=b"], {"notes": "a=b"}),
    ],
)
def test_apply_edits(edits: list[str], expected: dict[str, Any]) -> None:
    start = {"client_hosts": ["10.0.0.0/8"]}
    out = edit.apply_edits(start, edits)
    assert {k: out[k] for k in expected} == expected
    assert start == {"client_hosts": ["10.0.0.0/8"]}  # never mutated


@pytest.mark.parametrize(
    ("edits", "error"),
    [
        (["relay"], AdminError),
        (["=x"], AdminError),
        (["client_hosts-=192.0.2.1"], NotFound),
        (["relay+=x"], AdminError),  # not a list
        (["relay.sub=1"], AdminError),  # not a group
        (["notes=[unclosed"], AdminError),
    ],
)
def test_bad_edits_say_why(edits: list[str], error: type[Exception]) -> None:
    with pytest.raises(error):
        edit.apply_edits({"client_hosts": ["10.0.0.0/8"], "relay": "none"}, edits)


def test_collection_edits() -> None:
    document = normalise(BASE)
    with pytest.raises(Conflict, match="exists already"):
        edit.add_item(document, "connection_profiles", {"name": "apps"})
    with pytest.raises(NotFound, match="no send connector named 'x'"):
        edit.delete_item(document, "send_connectors", "x")
    renamed = edit.replace_item(
        document,
        "connection_profiles",
        "apps",
        {**edit.get_item(document, "connection_profiles", "apps"), "name": "applications"},
    )
    assert [p["name"] for p in renamed["connection_profiles"]] == ["partner", "applications"]
    with pytest.raises(Conflict):
        edit.replace_item(document, "connection_profiles", "apps", {"name": "partner"})
    where = ("connection_profiles", "partner", "client_hosts")
    with pytest.raises(Conflict):
        edit.add_value(document, where, "10.0.0.0/8")
    assert (
        edit.remove_value(document, where, "10.0.0.0/8")["connection_profiles"][0]["client_hosts"]
        == []
    )


@pytest.mark.parametrize(
    ("listen", "warned"),
    [("127.0.0.1:8025", False), ("[::1]:8025", False), ("", False), ("0.0.0.0:8025", True)],
)
def test_an_api_off_loopback_is_warned_about(listen: str, warned: bool) -> None:
    from smtpgate.config.validate import warnings  # noqa: PLC0415

    found = [w.path for w in warnings(parse_config({**BASE, "admin": {"listen": listen}}))]
    assert ("admin.listen" in found) == warned


def test_split_and_merge_are_inverse_and_keep_local_keys_apart() -> None:
    whole = normalise(BASE)
    shared, local = split(whole)
    assert "listeners" not in shared
    assert "admin" not in shared
    assert set(local) == {"gateway", "listeners", "admin", "logging"}
    assert set(local["gateway"]) == {
        "node", "hostname", "roles", "data_dir", "store", "store_password_file", "dns",
        "user", "group", "allow_root", "workers", "cpu_affinity",
    }  # fmt: skip
    assert set(shared["gateway"]) == {"admin_address", "banner"}
    assert merge(shared, local) == whole
    other = normalise({**BASE, "listeners": [{"name": "mx", "address": "127.0.0.1:1"}]})
    assert local_changes(whole, other) == ["listeners"]
    assert local_changes(whole, merge(split(other)[0], local)) == []


def test_an_export_marks_node_local_settings_and_reads_back() -> None:
    text = to_yaml(normalise(BASE))
    marked = [line.split(":")[0].strip() for line in text.splitlines() if LOCAL_MARK in line]
    assert marked == ["hostname", "data_dir", "listeners"]
    assert "hosted_domains:" in text
    assert "hosted_domains:" + LOCAL_MARK not in text
    assert normalise(yaml.safe_load(text)) == normalise(BASE)


@pytest.mark.parametrize(
    ("listen", "public", "warned"),
    [
        ("127.0.0.1:8025", True, False),
        ("0.0.0.0:8025", False, False),
        ("0.0.0.0:8025", True, True),
    ],
)
def test_public_metrics_off_loopback_are_warned_about(
    listen: str, public: bool, warned: bool
) -> None:
    from smtpgate.config.validate import warnings  # noqa: PLC0415

    admin = {"listen": listen, "metrics_public": public}
    found = [w.path for w in warnings(parse_config({**BASE, "admin": admin}))]
    assert ("admin.metrics_public" in found) == warned
