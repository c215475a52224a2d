"""SMTP AUTH on real sockets: only over TLS, PLAIN and LOGIN, throttling, no secrets in logs."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpgate.admin.operations import explain_policy
from smtpgate.config import parse_config
from smtpgate.config.secret import decrypt, encrypt, load_key
from smtpgate.policy.explain import Facts
from tests.conftest import SMTPGATE, Certs, GatewayFactory, SinkHandle, base_config, merge

PASSWORD = "correct horse battery"
BOB_PASSWORD = "s3cret-for-bob"


def auth_config(tmp_path: Path, certs: Certs, **listener: Any) -> dict[str, Any]:
    alice = tmp_path / "alice.pw"
    alice.write_text(PASSWORD + "\n")
    alice.chmod(0o600)
    data_dir = tmp_path / "gw-auth"
    bob = encrypt(load_key(data_dir, create=True), BOB_PASSWORD)
    return {
        "gateway": {"data_dir": str(data_dir), "admin_address": "postmaster@example.com"},
        "listeners": [
            {
                "name": "mx",
                "address": "127.0.0.1:0",
                "security": "starttls",
                "certificate": "gw",
                **listener,
            }
        ],
        "certificates": [{"name": "gw", "cert": str(certs.cert_file), "key": str(certs.key_file)}],
        "limits": {"max_auth_failures": 2, "auth_failure_delay": 0},
        "connection_profiles": [
            {
                "name": "submitters",
                "relay": "full",
                "smtp_auth": {
                    "enabled": True,
                    "credentials": [
                        {"username": "alice", "password_file": str(alice)},
                        {"username": "bob", "password": bob},
                    ],
                },
            }
        ],
        "send_connectors": [
            {
                "name": "anywhere",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": 0}},
            }
        ],
    }


@pytest.fixture
async def gw_port(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path, certs: Certs
) -> int:
    config = auth_config(tmp_path, certs)
    config["send_connectors"][0]["deliver"]["smarthost"]["port"] = sink.port
    return (await gateway_factory(**config)).port


def _tls(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_file))


async def test_auth_is_not_offered_or_accepted_in_the_clear(gw_port: int) -> None:
    def attempt() -> tuple[bool, int]:
        with smtplib.SMTP("127.0.0.1", gw_port, timeout=30) as client:
            client.ehlo("c.example")
            code, _ = client.docmd(
                "AUTH", "PLAIN " + base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
            )
            return client.has_extn("auth"), code

    assert await asyncio.to_thread(attempt) == (False, 503)


@pytest.mark.parametrize(
    ("user", "password", "mechanism"),
    [("alice", PASSWORD, "PLAIN"), ("bob", BOB_PASSWORD, "LOGIN")],
)
async def test_authenticated_user_relays_as_its_profile(
    gw_port: int, sink: SinkHandle, certs: Certs, user: str, password: str, mechanism: str
) -> None:
    def send() -> str:
        with smtplib.SMTP("127.0.0.1", gw_port, timeout=30) as client:
            client.starttls(context=_tls(certs))
            client.ehlo("c.example")
            offered = client.esmtp_features["auth"]
            client.user, client.password = user, password
            method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            client.auth(mechanism, method)
            client.sendmail(
                f"{user}@example.com", ["x@foreign.example"], b"Subject: t\r\n\r\nx\r\n"
            )
            return offered

    assert (await asyncio.to_thread(send)).split() == ["PLAIN", "LOGIN"]
    [(meta, body)] = await sink.wait_for(1)
    assert meta["recipients"] == ["x@foreign.example"]
    assert b"with ESMTPSA id" in body


async def test_unauthenticated_tls_client_still_cannot_relay(
    gw_port: int, sink: SinkHandle, certs: Certs
) -> None:
    def send() -> None:
        with smtplib.SMTP("127.0.0.1", gw_port, timeout=30) as client:
            client.starttls(context=_tls(certs))
            client.sendmail("a@foreign.example", ["x@other.example"], b"Subject: t\r\n\r\nx\r\n")

    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(send)
    assert await sink.wait_for(1, timeout=1.5) == []  # nothing arrives, even later


async def test_failures_are_refused_then_locked_out_and_never_logged(
    gw_port: int, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    def attempts() -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", gw_port, timeout=30) as client:
            client.starttls(context=_tls(certs))
            client.ehlo("c.example")
            for password in ("wrong-1", "wrong-2", PASSWORD):
                token = base64.b64encode(f"\0alice\0{password}".encode()).decode()
                codes.append(client.docmd("AUTH", f"PLAIN {token}")[0])
        return codes

    assert await asyncio.to_thread(attempts) == [535, 454, 454]
    logged = "".join(capsys.readouterr())
    assert "auth failed" in logged
    for secret in ("wrong-1", "wrong-2", PASSWORD):
        assert secret not in logged


async def test_plaintext_auth_on_loopback_by_explicit_setting(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path, certs: Certs
) -> None:
    config = auth_config(tmp_path, certs, plaintext_auth_on_loopback=True)
    config["send_connectors"][0]["deliver"]["smarthost"]["port"] = sink.port
    gw = await gateway_factory(**config)

    def login() -> bool:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.ehlo("c.example")
            offered = client.has_extn("auth")
            client.login("alice", PASSWORD)
            return offered

    assert await asyncio.to_thread(login)


async def test_credentials_send_mails_them_to_the_administrator(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path, certs: Certs
) -> None:
    config = auth_config(tmp_path, certs)
    config["send_connectors"][0]["deliver"]["smarthost"]["port"] = sink.port
    await gateway_factory(**config)  # the running gateway delivers what the command queues
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(merge(base_config(tmp_path / "gw0", sink.port), config)))
    process = await asyncio.create_subprocess_exec(
        SMTPGATE,
        "credentials",
        "send",
        "submitters",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert out.startswith(b"queued as ")
    [(meta, body)] = await sink.wait_for(1)
    assert meta["recipients"] == ["postmaster@example.com"]
    assert f"user name: alice\r\n  password:  {PASSWORD}".encode() in body
    assert f"user name: bob\r\n  password:  {BOB_PASSWORD}".encode() in body
    assert PASSWORD.encode() not in out + err


def test_credentials_encrypt_round_trips(tmp_path: Path, certs: Certs) -> None:
    path = tmp_path / "gw.yaml"
    data_dir = tmp_path / "data"
    path.write_text(
        yaml.safe_dump(
            {
                "gateway": {"data_dir": str(data_dir)},
                "listeners": [{"name": "mx", "address": "127.0.0.1:0", "security": "none"}],
            }
        )
    )
    result = subprocess.run(
        [SMTPGATE, "credentials", "encrypt", "--config", str(path)],
        input="pa55word\n",
        capture_output=True,
        text=True,
        check=True,
    )
    token = result.stdout.strip()
    assert token.startswith("enc:v1:")
    assert "pa55word" not in token
    assert oct((data_dir / "keys" / "secret.key").stat().st_mode & 0o777) == "0o600"
    assert decrypt(load_key(data_dir, create=False), token, "x").get_secret_value() == "pa55word"


def test_policy_explain_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "hosted_domains": ["example.com"],
                "listeners": [{"name": "mx", "address": "127.0.0.1:0", "security": "none"}],
                "connection_profiles": [
                    {"name": "exchange", "client_hosts": ["10.0.0.0/24"], "relay": "full"},
                    {
                        "name": "partner",
                        "sender_domains": ["partner.example"],
                        "inbound_tls": {"mandatory": True},
                        "relay": "restricted-external",
                        "outbound_tls": {
                            "mandatory": True,
                            "validate_certificate": True,
                            "match": ["recipient_domain"],
                        },
                    },
                ],
                "send_connectors": [
                    {
                        "name": "internet",
                        "deliver": {"smarthost": {"host": "192.0.2.1"}},
                        "cost": 10,
                    },
                    {
                        "name": "mailstore",
                        "deliver": {"smarthost": {"host": "192.0.2.2"}},
                        "cost": 5,
                        "namespaces": [{"recipient": "example.com"}],
                    },
                ],
            }
        )
    )
    base = [SMTPGATE, "policy", "explain", "--config", str(path)]
    text = subprocess.run(
        [
            *base,
            "--client-ip",
            "10.0.0.9",
            "--sender",
            "a@example.com",
            "--recipient",
            "b@foreign.example",
            "--recipient",
            "c@example.com",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "connection profile 'exchange': client IP matches 10.0.0.0/24" in text
    assert "relay full" in text
    assert "spam check:   no" in text
    assert "recipient b@foreign.example: accept" in text
    assert "connector:  internet" in text
    assert "connector:  mailstore" in text
    result = json.loads(
        subprocess.run(
            [
                *base,
                "--client-ip",
                "192.0.2.50",
                "--sender",
                "x@partner.example",
                "--recipient",
                "b@foreign.example",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert result["profile"]["default"] is True
    assert result["inbound_tls"]["required"] is True
    assert result["inbound_tls"]["verdict"]["reply"].startswith("530 5.7.0")
    assert result["recipients"][0]["accepted"] is False
    assert result["recipients"][0]["reply"].startswith("554 5.7.1")
    assert result["spam_check"]["checked"] is True
    outbound = json.loads(
        subprocess.run(
            [*base, "--client-ip", "10.0.0.9", "--recipient", "x@partner.example", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["recipients"][0]["outbound_tls"]
    assert outbound["mandatory"] is True
    assert outbound["names"] == ["partner.example"]
    assert "connection profile 'partner': mandatory TLS" in outbound["reasons"]


@pytest.mark.parametrize(
    "profile",
    [
        {"relay": "full", "smtp_auth": {"enabled": False}},
        {"relay": "blocked", "smtp_auth": {"enabled": True}},
    ],
    ids=["auth-disabled", "blocked"],
)
async def test_explain_agrees_with_the_server_when_a_user_cannot_authenticate(
    gateway_factory: GatewayFactory,
    sink: SinkHandle,
    tmp_path: Path,
    certs: Certs,
    profile: dict[str, Any],
) -> None:
    """explain showed "relay full: any recipient" for these users while the
    server answered 535 to AUTH and then 554 to RCPT."""
    config = auth_config(tmp_path, certs)
    config["send_connectors"][0]["deliver"]["smarthost"]["port"] = sink.port
    carol = {
        "username": "carol",
        "password": config["connection_profiles"][0]["smtp_auth"]["credentials"][1]["password"],
    }
    config["connection_profiles"].append(
        merge({"name": "carols", "smtp_auth": {"credentials": [carol]}}, profile)
    )
    port = (await gateway_factory(**config)).port

    def session() -> tuple[int, int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.starttls(context=_tls(certs))
            client.ehlo("c.example")
            token = base64.b64encode(f"\0carol\0{BOB_PASSWORD}".encode()).decode()
            auth, _ = client.docmd("AUTH", f"PLAIN {token}")
            client.mail("carol@foreign.example")
            rcpt, _ = client.rcpt("x@other.example")
            return auth, rcpt

    assert await asyncio.to_thread(session) == (535, 554)
    facts = Facts(
        "127.0.0.1",
        sender="carol@foreign.example",
        recipients=["x@other.example"],
        tls=True,
        auth_user="carol",
    )
    explained = explain_policy(parse_config(merge(base_config(tmp_path, 1), config)), facts)
    assert explained.auth is not None
    assert "authentication would fail" in explained.auth
    [recipient] = explained.recipients
    assert not recipient.verdict.accepted
    assert recipient.verdict.reply is not None
    assert recipient.verdict.reply.code == 554


@pytest.mark.parametrize("address", ["999.1.1.1", "10.0.0", "example.com", ""])
def test_policy_explain_refuses_an_invalid_client_ip(tmp_path: Path, address: str) -> None:
    """It used to explain the default profile for 999.1.1.1 and exit 0."""
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path / "var", 2526)))
    done = subprocess.run(
        [SMTPGATE, "policy", "explain", "--config", str(path), "--client-ip", address],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert f"argument --client-ip: {address!r} is not an IPv4 or IPv6 address" in done.stderr
    assert "profile:" not in done.stdout
