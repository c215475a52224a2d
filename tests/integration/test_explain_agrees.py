"""``policy explain`` and the server give the same verdicts, case by case.

Every case of the relay, AUTH and TLS tables runs twice: through a live
SMTP session on loopback (connect from a profile's address, STARTTLS, AUTH,
MAIL, RCPT) and through ``explain`` with the same facts. The replies must
match step for step. Both replay one ``SessionPolicy``; this test is what
keeps them from drifting (explain once showed "relay full" for a user the
server refused with 535, then 554).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import smtplib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smtpgate.admin.operations import explain_policy
from smtpgate.config import parse_config
from smtpgate.config.secret import encrypt, load_key
from smtpgate.policy.explain import Explanation, Facts
from tests.conftest import Certs, GatewayFactory, SinkHandle, base_config, merge

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


@dataclass(frozen=True)
class Case:
    source: str
    tls: bool
    user: str | None
    sender: str
    recipient: str


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


def config(tmp_path: Path, certs: Certs, sink_port: int) -> dict[str, Any]:
    data_dir = tmp_path / "gw-agree"
    token = encrypt(load_key(data_dir, create=True), PASSWORD)

    def profile(name: str, address: str, relay: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "client_hosts": [address], "relay": relay, **extra}

    return {
        "gateway": {"data_dir": str(data_dir), "admin_address": "postmaster@example.com"},
        "hosted_domains": ["example.com"],
        "listeners": [
            {"name": "mx", "address": "127.0.0.1:0", "security": "starttls", "certificate": "gw"}
        ],
        "certificates": [{"name": "gw", "cert": str(certs.cert_file), "key": str(certs.key_file)}],
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


def live(port: int, certs: Certs, case: Case) -> list[int]:
    """The codes the server gave: connect, [AUTH], MAIL, RCPT (stopping at a refusal)."""
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(case.source, 0))
    except smtplib.SMTPConnectError as refused:
        return [refused.smtp_code]
    codes = [220]
    try:
        client.ehlo("client.example")
        if case.tls:
            client.starttls(context=ssl.create_default_context(cafile=str(certs.ca_file)))
            client.ehlo("client.example")
        if case.user is not None:
            token = base64.b64encode(f"\0{case.user}\0{PASSWORD}".encode()).decode()
            codes.append(client.docmd("AUTH", f"PLAIN {token}")[0])
        codes.append(client.docmd("MAIL", f"FROM:<{case.sender}>")[0])
        if codes[-1] == 250:
            codes.append(client.docmd("RCPT", f"TO:<{case.recipient}>")[0])
        client.docmd("RSET")
    finally:
        client.close()
    return codes


def explained(result: Explanation, case: Case) -> list[int]:
    """The same steps as ``explain`` sees them."""
    if not result.connect.accepted:
        return [554]
    codes = [220]
    if case.user is not None:
        codes.append(235 if result.auth and "would fail" not in result.auth else 535)
    refusal = next((v for v in (result.tls, result.sender) if v and not v.accepted), None)
    codes.append(refusal.reply.code if refusal and refusal.reply else 250)
    if codes[-1] == 250:
        [rcpt] = result.recipients
        codes.append(rcpt.verdict.reply.code if rcpt.verdict.reply else 250)
    return codes


async def test_explain_gives_the_servers_verdict_in_every_case(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path, certs: Certs
) -> None:
    document = config(tmp_path, certs, sink.port)
    port = (await gateway_factory(**document)).port
    parsed = parse_config(merge(base_config(tmp_path, sink.port), document))
    disagreements = []
    refused = 0
    for case in CASES:
        server = await asyncio.to_thread(live, port, certs, case)
        facts = Facts(
            case.source,
            sender=case.sender,
            recipients=[case.recipient],
            tls=case.tls,
            auth_user=case.user,
        )
        explanation = explained(explain_policy(parsed, facts), case)
        if server != explanation:
            disagreements.append((case, server, explanation))
        refused += server[-1] >= 400
    assert disagreements == []
    assert len(CASES) == 108
    assert 20 < refused < len(CASES) - 20  # the table has both outcomes in plenty


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
