"""POP3 receive connector settings: what the schema refuses and `config check` says."""

from __future__ import annotations

from typing import Any

import pytest

from smtpgate.config.load import parse_config
from smtpgate.config.schema import GatewayConfig
from smtpgate.config.validate import validate, warnings
from smtpgate.errors import ConfigError
from smtpgate.fetch.ingest import envelope_sender


def document(**connector: Any) -> dict[str, Any]:
    box = {"username": "inbox", "password_file": "/etc/smtpgate/pop3", "deliver_to": ["a@x.org"]}
    return {
        "gateway": {"hostname": "gw.test", "data_dir": "/tmp/none"},
        "listeners": [{"name": "mx", "address": "127.0.0.1:2525", "security": "none"}],
        "send_connectors": [
            {"name": "out", "deliver": {"smarthost": {"host": "relay.example", "port": 25}}}
        ],
        "receive_connectors": {
            "pop3": [{"name": "provider", "host": "pop.example", "mailboxes": [box], **connector}]
        },
    }


def model(doc: dict[str, Any]) -> GatewayConfig:
    """The schema's model only (no cross-field checks, no files read)."""
    return GatewayConfig.model_validate(doc)


def messages(problems: list[Any]) -> list[str]:
    return [f"{p.path}: {p.message}" for p in problems]


def test_defaults_demand_stls_and_validate_the_certificate() -> None:
    config = model(document())
    [connector] = config.receive_connectors.pop3
    assert (connector.security, connector.validate_certificate) == ("require-starttls", True)
    assert connector.effective_port == 110
    implicit = model(document(security="implicit-tls")).receive_connectors.pop3[0]
    assert implicit.port is None
    assert implicit.effective_port == 995


def test_a_clear_password_is_refused() -> None:
    doc = document()
    doc["receive_connectors"]["pop3"][0]["mailboxes"][0] = {
        "username": "inbox",
        "password": "secret",
        "deliver_to": ["a@x.org"],
    }
    with pytest.raises(ConfigError, match="must be encrypted"):
        parse_config(doc)


def test_config_check_names_the_problems() -> None:
    config = model(document(name="out", profile="nobody-knows"))
    found = messages(validate(config))
    assert any("pop3" in m and "cannot read" in m for m in found), found  # secret files
    assert any("a send connector has this name" in m for m in found), found
    assert any("no connection profile 'nobody-knows'" in m for m in found), found


def test_config_check_warns_about_plaintext_and_unchecked_certificates() -> None:
    found = messages(warnings(model(document(security="none"))))
    assert any("travel unencrypted" in m for m in found), found
    found = messages(warnings(model(document(validate_certificate=False))))
    assert any("pose as the server" in m for m in found), found


@pytest.mark.parametrize(
    ("head", "sender"),
    [
        (b"Return-Path: <bob@example.org>\r\nSubject: x\r\n\r\nbody", "bob@example.org"),
        (b"Return-Path: <>\r\n\r\nbody", ""),
        (b"Subject: x\r\n\r\nReturn-Path: <in@body.example>\r\n", ""),  # not in the head
        (b"Return-Path: <a b@x>\r\n\r\n", ""),
        (b"Subject: x\r\n\r\n", ""),
    ],
)
def test_the_envelope_sender_is_the_return_path(head: bytes, sender: str) -> None:
    assert envelope_sender(head) == sender
