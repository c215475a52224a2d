"""``policy explain`` and the server give the same verdicts, case by case.

Every case of the relay, AUTH and TLS tables runs twice: through a live
SMTP session on loopback (connect from a profile's address, STARTTLS, AUTH,
MAIL, RCPT) and through ``explain`` with the same facts. The replies must
match step for step. Both replay one ``SessionPolicy``; this test is what
keeps them from drifting (explain once showed "relay full" for a user the
server refused with 535, then 554).

The listeners' own demands are cases too: a ``require-starttls`` listener
(MAIL before STARTTLS is refused by the policy's listener step, which explain
replays with ``Facts.listener``) and listeners that want a client
certificate, where the first refusal decides which 530 text the client sees.
A refused MAIL must agree in its text, not only its code.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import smtplib
import ssl
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpgate.admin.operations import explain_policy
from smtpgate.config import parse_config
from smtpgate.config.secret import encrypt, load_key
from smtpgate.policy.explain import Explanation, Facts, UnknownListenerError
from smtpgate.policy.verdict import Verdict
from tests.conftest import SMTPGATE, Certs, GatewayFactory, SinkHandle, base_config, merge

PASSWORD = "s3cret-for-everyone"
SOURCES = {
    "127.0.0.2": "full",
    "127.0.0.3": "restricted-external",
    "127.0.0.4": "restricted-internal",
    "127.0.0.5": "blocked",
    "127.0.0.6": "none",  # mandatory inbound TLS
    "127.0.0.1": "default",
}
SENDERS = ["a@example.com", "b@partner.example"]
RECIPIENTS = ["alice@example.com", "x@other.example", "postmaster"]
USERS = ["alice", "carol", "nobody"]  # full + AUTH; AUTH disabled; unknown
# listener -> (security, client_identity)
LISTENERS = {
    "mx": ("starttls", "any"),
    "strict": ("require-starttls", "any"),
    "certs": ("starttls", "trusted"),
    "strict-certs": ("require-starttls", "trusted"),
}


@dataclass(frozen=True)
class Case:
    source: str
    tls: bool
    user: str | None
    sender: str
    recipient: str
    listener: str = "mx"


CASES = [
    Case(source, tls, None, sender, recipient)
    for source, tls, sender, recipient in itertools.product(
        SOURCES, (False, True), SENDERS, RECIPIENTS
    )
] + [
    Case(source, True, user, sender, recipient)
    for source, user, sender, recipient in itertools.product(
        ("127.0.0.1", "127.0.0.3"), USERS, SENDERS, RECIPIENTS
    )
]
# require-starttls, with and without STARTTLS; the certificate listeners in the
# clear only (their handshake needs a client certificate).
LISTENER_CASES = [
    Case(source, tls, None, sender, "alice@example.com", "strict")
    for source, tls, sender in itertools.product(SOURCES, (False, True), SENDERS)
] + [
    Case(source, False, None, sender, "alice@example.com", listener)
    for listener, source, sender in itertools.product(
        ("certs", "strict-certs"), ("127.0.0.1", "127.0.0.5", "127.0.0.6"), SENDERS
    )
]


def config(tmp_path: Path, certs: Certs, sink_port: int) -> dict[str, Any]:
    data_dir = tmp_path / "gw-agree"
    token = encrypt(load_key(data_dir, create=True), PASSWORD)

    def profile(name: str, address: str, relay: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "client_hosts": [address], "relay": relay, **extra}

    return {
        "gateway": {"data_dir": str(data_dir), "admin_address": "postmaster@example.com"},
        "hosted_domains": ["example.com"],
        "listeners": [
            {
                "name": name,
                "address": "127.0.0.1:0",
                "security": security,
                "certificate": "gw",
                "client_identity": identity,
            }
            for name, (security, identity) in LISTENERS.items()
        ],
        "certificates": [{"name": "gw", "cert": str(certs.cert_file), "key": str(certs.key_file)}],
        "tls": {"ca_files": [str(certs.ca_file)]},
        "limits": {"max_auth_failures": 1000, "auth_failure_delay": 0},
        "connection_profiles": [
            profile("inside", "127.0.0.2", "full"),
            profile("partner", "127.0.0.3", "restricted-external"),
            profile("servers", "127.0.0.4", "restricted-internal"),
            profile("bad", "127.0.0.5", "blocked"),
            profile("secure", "127.0.0.6", "none", inbound_tls={"mandatory": True}),
            {
                "name": "submitters",
                "relay": "full",
                "smtp_auth": {
                    "enabled": True,
                    "credentials": [{"username": "alice", "password": token}],
                },
            },
            {
                "name": "disabled",
                "relay": "full",
                "smtp_auth": {
                    "enabled": False,
                    "credentials": [{"username": "carol", "password": token}],
                },
            },
        ],
        "send_connectors": [
            {
                "name": "out",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink_port}},
            }
        ],
    }


def live(port: int, certs: Certs, case: Case) -> tuple[list[int], str]:
    """The codes the server gave: connect, [AUTH], MAIL, RCPT (stopping at a
    refusal); and a refused MAIL's reply."""
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(case.source, 0))
    except smtplib.SMTPConnectError as refused:
        return [refused.smtp_code], ""
    codes, mail = [220], ""
    try:
        client.ehlo("client.example")
        if case.tls:
            client.starttls(context=ssl.create_default_context(cafile=str(certs.ca_file)))
            client.ehlo("client.example")
        if case.user is not None:
            token = base64.b64encode(f"\0{case.user}\0{PASSWORD}".encode()).decode()
            codes.append(client.docmd("AUTH", f"PLAIN {token}")[0])
        code, text = client.docmd("MAIL", f"FROM:<{case.sender}>")
        codes.append(code)
        if code == 250:
            codes.append(client.docmd("RCPT", f"TO:<{case.recipient}>")[0])
        else:
            mail = f"{code} {text.decode()}"
        client.docmd("RSET")
    finally:
        client.close()
    return codes, mail


def explained(result: Explanation, case: Case) -> tuple[list[int], str]:
    """The same steps as ``explain`` sees them."""
    if not result.connect.accepted:
        return [554], ""
    codes = [220]
    if case.user is not None:
        codes.append(235 if result.auth and "would fail" not in result.auth else 535)
    steps = (result.listener_step, result.tls, result.sender)  # the server's order
    refusal = next((v for v in steps if v and not v.accepted), None)
    reply = refusal.reply if refusal else None
    codes.append(reply.code if reply else 250)
    if codes[-1] == 250:
        [rcpt] = result.recipients
        codes.append(rcpt.verdict.reply.code if rcpt.verdict.reply else 250)
    return codes, reply.text() if reply else ""


def facts(case: Case) -> Facts:
    return Facts(
        case.source,
        sender=case.sender,
        recipients=[case.recipient],
        tls=case.tls,
        auth_user=case.user,
        listener=case.listener,
    )


async def test_explain_gives_the_servers_verdict_in_every_case(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path, certs: Certs
) -> None:
    document = config(tmp_path, certs, sink.port)
    ports = (await gateway_factory(**document)).ports
    parsed = parse_config(merge(base_config(tmp_path, sink.port), document))
    disagreements = []
    refused = 0
    for case in CASES:
        server = await asyncio.to_thread(live, ports[case.listener], certs, case)
        explanation = explained(explain_policy(parsed, facts(case)), case)
        if server != explanation:
            disagreements.append((case, server, explanation))
        refused += server[0][-1] >= 400
    assert disagreements == []
    assert len(CASES) == 108
    assert 20 < refused < len(CASES) - 20  # the table has both outcomes in plenty


async def test_explain_gives_the_servers_verdict_on_listeners_that_demand_tls(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path, certs: Certs
) -> None:
    """The listener's step is the policy's: explain with ``listener`` gives the
    same reply, text and all, as the live listener does."""
    document = config(tmp_path, certs, sink.port)
    ports = (await gateway_factory(**document)).ports
    parsed = parse_config(merge(base_config(tmp_path, sink.port), document))
    disagreements, mail_replies = [], set()
    for case in LISTENER_CASES:
        server = await asyncio.to_thread(live, ports[case.listener], certs, case)
        explanation = explained(explain_policy(parsed, facts(case)), case)
        if server != explanation:
            disagreements.append((case, server, explanation))
        mail_replies.add((case.listener, case.tls, server[1]))
    assert disagreements == []
    assert len(LISTENER_CASES) == 36
    must, certificate = (
        "530 5.7.0 Must issue a STARTTLS command first",
        "530 5.7.0 Must issue STARTTLS and present an accepted client certificate first",
    )
    assert ("strict", False, must) in mail_replies
    assert ("strict", True, "") in mail_replies  # accepted after STARTTLS
    assert ("certs", False, certificate) in mail_replies
    assert ("strict-certs", False, must) in mail_replies  # the listener's TLS first
    assert ("strict-certs", False, certificate) not in mail_replies


@pytest.mark.parametrize("user", USERS)
def test_explain_names_why_a_user_cannot_authenticate(
    tmp_path: Path, certs: Certs, user: str
) -> None:
    parsed = parse_config(merge(base_config(tmp_path, 2526), config(tmp_path, certs, 2526)))
    result = explain_policy(parsed, Facts("127.0.0.1", tls=True, auth_user=user))
    expected = {
        "alice": "user 'alice': authenticated into connection profile 'submitters'",
        "carol": "connection profile 'disabled' has SMTP AUTH disabled",
        "nobody": "unknown user or wrong password",
    }[user]
    assert result.auth is not None
    assert expected in result.auth


def test_explain_shows_the_connection_reserve_and_where_postmaster_goes(
    tmp_path: Path, certs: Certs
) -> None:
    document = merge(base_config(tmp_path, 2526), config(tmp_path, certs, 2526))
    document["limits"] |= {"max_connections": 200, "profile_reserve": 0.25}
    parsed = parse_config(document)
    known = explain_policy(parsed, Facts("127.0.0.2", recipients=["postmaster"]))
    assert known.connections == (
        "may use all 200, the 50 kept for clients a profile names by IP included"
    )
    [postmaster] = known.recipients
    assert postmaster.connector_reason.endswith("delivered to postmaster@example.com")
    anonymous = explain_policy(parsed, Facts("192.0.2.9"))
    assert anonymous.connections == "may use 150 of 200; 50 kept for clients a profile names by IP"
    blocked = explain_policy(parsed, Facts("127.0.0.5"))
    assert blocked.connections.startswith("may use 150 of 200")


def test_explain_shows_the_listener_step_in_text_and_json(tmp_path: Path, certs: Certs) -> None:
    parsed = parse_config(merge(base_config(tmp_path, 2526), config(tmp_path, certs, 2526)))
    clear = Facts("127.0.0.2", sender="a@example.com", recipients=["x@other.example"])
    refused = explain_policy(parsed, replace(clear, listener="strict")).as_dict()
    assert refused["listener"] == {
        "name": "strict",
        "security": "require-starttls",
        "requires_tls": True,
        "client_certificate_required": False,
        "accepted": False,
        "reply": "530 5.7.0 Must issue a STARTTLS command first",
        "reason": "listener strict: require-starttls: MAIL refused without TLS",
    }
    text = explain_policy(parsed, replace(clear, listener="strict")).as_text()
    assert (
        "listener:     listener strict: require-starttls: MAIL refused without TLS"
        " (530 5.7.0 Must issue a STARTTLS command first)"
    ) in text.splitlines()
    secure = explain_policy(parsed, replace(clear, listener="strict", tls=True))
    assert "listener strict: require-starttls: TLS is active" in secure.as_text()
    assert explain_policy(parsed, replace(clear, listener="mx")).listener_step == (
        Verdict.accept("listener mx: starttls: TLS not required before MAIL")
    )
    unnamed = explain_policy(parsed, clear)  # no listener: no listener step, as before
    assert unnamed.as_dict()["listener"] is None
    assert "listener:" not in unnamed.as_text()


def test_explain_refuses_an_unknown_listener(tmp_path: Path, certs: Certs) -> None:
    parsed = parse_config(merge(base_config(tmp_path, 2526), config(tmp_path, certs, 2526)))
    with pytest.raises(UnknownListenerError, match="no listener named 'nothere'"):
        explain_policy(parsed, Facts("127.0.0.2", listener="nothere"))


def test_policy_explain_listener_option(tmp_path: Path, certs: Certs) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(merge(base_config(tmp_path, 2526), config(tmp_path, certs, 2526)))
    )
    base = [SMTPGATE, "policy", "explain", "--config", str(path), "--client-ip", "127.0.0.2"]
    done = subprocess.run(
        [*base, "--listener", "strict", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout)["listener"]["reply"].startswith("530 5.7.0")
    done = subprocess.run(
        [*base, "--listener", "nothere"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2  # bad usage, as a bad --client-ip
    assert "argument --listener: no listener named 'nothere' (configured: mx, strict," in (
        done.stderr
    )
    assert "profile:" not in done.stdout
