"""The outbound TLS table as operators see it: ``smtpgate policy explain --lookup``
and ``smtpgate connector verify --domain`` (real processes) say which of
connector, profile, DANE and MTA-STS applies to each MX host, and why, from the
records a real DNS server and a real HTTPS server publish."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SMTPGATE, Certs, SinkHandle, base_config, merge, run_tool
from tests.dnsserver import DnsServer
from tests.integration.outbound_security import (
    POLICY_PATH,
    Https,
    issue,
    policy_response,
    policy_text,
    spki_sha256,
    start_dns_for,
    start_https,
)


@pytest.fixture
async def servers(certs: Certs, tmp_path: Path) -> AsyncIterator[tuple[DnsServer, int, Https]]:
    cert, key = issue(certs.ca, tmp_path, "mta-sts.example.com")
    https = await start_https(cert, key, {})
    https.responses[POLICY_PATH] = policy_response(policy_text("enforce", "mx.example.com"))
    dns, port = await start_dns_for(
        {
            ("_mta-sts.example.com", "TXT"): ['"v=STSv1; id=1"'],
            ("mta-sts.example.com", "A"): ["127.0.0.1"],
            ("example.net", "MX"): ["10 mx.example.net."],
            ("mx.example.net", "A"): ["127.0.0.1"],
            ("_25._tcp.mx.example.net", "TLSA"): [f"3 1 1 {spki_sha256(cert)}"],
        },
        secure=("example.net",),
    )
    yield dns, port, https
    https.close()
    assert dns.transport is not None
    dns.transport.close()


def _config(
    tmp_path: Path, sink: SinkHandle, certs: Certs, dns_port: int, https: Https, **extra: Any
) -> Path:
    document = merge(
        base_config(tmp_path / "gw", sink.port),
        {
            "gateway": {"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
            "tls": {"ca_files": [str(certs.ca_file)]},
            "hosted_domains": ["example.org"],
            "connection_profiles": [
                {"name": "inside", "client_hosts": ["127.0.0.1"], "relay": "full"}
            ],
            "outbound_security": {"mta_sts_port": https.port, "dane": True},
            "send_connectors": [
                {"name": "mx", "security": "starttls", "deliver": {"dns": {"port": 25}}}
            ],
            **extra,
        },
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def test_explain_shows_mta_sts_and_dane_per_mx_host(
    servers: tuple[DnsServer, int, Https], sink: SinkHandle, certs: Certs, tmp_path: Path
) -> None:
    _, dns_port, https = servers
    config = _config(tmp_path, sink, certs, dns_port, https)
    args = [SMTPGATE, "policy", "explain", "--config", str(config), "--client-ip", "127.0.0.1"]
    args += ["--sender", "bob@example.org", "--lookup"]
    code, out = await run_tool(
        *args, "--recipient", "alice@example.com", "--recipient", "carol@example.net"
    )
    assert code == 0, out
    assert (
        "  MX mx.example.com: TLS from TLSv1.2, certificate must match mx.example.com"
        " (connector mx: security starttls; MTA-STS enforce (MTA-STS policy id 1):"
        " TLS 1.2 or later and a valid certificate for mx.example.com)"
    ) in out
    assert "  MX mx.example.net: TLS, authenticated by DANE (1 TLSA record(s))" in out
    assert "DNSSEC-validated TLSA record(s) at _25._tcp.mx.example.net" in out
    code, out = await run_tool(*args, "--json", "--recipient", "alice@example.com")
    [mx] = json.loads(out)["recipients"][0]["mx_tls"]
    assert (mx["host"], mx["published"], mx["validate"]) == ("mx.example.com", "sts", True)


async def test_explain_without_lookup_shows_the_configured_override(
    servers: tuple[DnsServer, int, Https], sink: SinkHandle, certs: Certs, tmp_path: Path
) -> None:
    _, dns_port, https = servers
    config = _config(tmp_path, sink, certs, dns_port, https)
    document = yaml.safe_load(config.read_text())
    document["outbound_security"]["domains"] = [{"domain": "example.com", "mta_sts": "enforce"}]
    config.write_text(yaml.safe_dump(document))
    code, out = await run_tool(
        SMTPGATE, "policy", "explain", "--config", str(config), "--client-ip", "127.0.0.1",
        "--sender", "bob@example.org", "--recipient", "alice@example.com",
    )  # fmt: skip
    assert code == 0, out
    assert "MTA-STS enforce (outbound_security.domains)" in out
    assert https.requests == []  # nothing was looked up


async def test_connector_verify_names_the_requirement_of_each_mx(
    servers: tuple[DnsServer, int, Https], sink: SinkHandle, certs: Certs, tmp_path: Path
) -> None:
    _, dns_port, https = servers
    config = _config(tmp_path, sink, certs, dns_port, https)
    _, out = await run_tool(  # the MX on port 25 does not answer: the table is shown first
        SMTPGATE, "connector", "verify", "mx", "--config", str(config), "--domain", "example.net"
    )
    assert "outbound TLS" in out, out
    assert "mx.example.net: TLS, authenticated by DANE (1 TLSA record(s))" in out
