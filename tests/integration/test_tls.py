"""Certificates and TLS settings, with real handshakes against real listeners."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import smtplib
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from smtpgate.config.load import parse_config
from smtpgate.tls.certificates import load_all, self_signed, spki_pin
from smtpgate.tls.context import CIPHERS, server_context
from tests.conftest import SMTPGATE, Certs, GatewayFactory, run_tool
from tests.integration.test_auth_live import PASSWORD, auth_config

WEAK = ("RC4", "DES-CBC3", "DES-CBC-", "NULL", "EXP", "ADH", "AECDH", "MD5", "anon")


@pytest.mark.parametrize("strength", sorted(CIPHERS))
def test_every_strength_level_stays_at_128_bits_or_more(certs: Certs, strength: str) -> None:
    loaded = load_all(
        parse_config(
            {
                "listeners": [{"name": "mx", "address": "127.0.0.1:0", "security": "none"}],
                "certificates": [
                    {"name": "c", "cert": str(certs.cert_file), "key": str(certs.key_file)}
                ],
            }
        ).certificates,
        lambda: pytest.fail("no key needed"),
    )["c"]  # type: ignore[arg-type, return-value]
    context = server_context(loaded, ["TLSv1.2", "TLSv1.3"], strength)
    ciphers = context.get_ciphers()
    assert min(c["strength_bits"] for c in ciphers) >= 128
    assert not [c["name"] for c in ciphers if any(w in c["name"] for w in WEAK)]


def _pkcs12(tmp_path: Path, certs: Certs, pin: bytes) -> Path:
    key = serialization.load_pem_private_key(certs.key_file.read_bytes(), None)
    chain = x509.load_pem_x509_certificates(certs.cert_file.read_bytes())
    blob = pkcs12.serialize_key_and_certificates(
        b"gw",
        key,
        chain[0],
        chain[1:],  # type: ignore[arg-type]
        serialization.BestAvailableEncryption(pin),
    )
    path = tmp_path / "gw.p12"
    path.write_bytes(blob)
    path.chmod(0o600)
    return path


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


async def _handshake(port: int, certs: Certs, *, maximum: ssl.TLSVersion | None = None) -> str:
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    if maximum is not None:
        context.maximum_version = maximum
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="gw.test"
    )
    greeting = await reader.readline()
    version = writer.get_extra_info("ssl_object").version()
    writer.close()
    assert greeting.startswith(b"220 ")
    return str(version)


def _implicit(certificate: dict[str, Any], **tls: Any) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "name": "mx",
                "address": "127.0.0.1:0",
                "security": "implicit-tls",
                "certificate": "gw",
            }
        ],
        "certificates": [{"name": "gw", **certificate}],
        **({"tls": tls} if tls else {}),
    }


async def test_pkcs12_with_a_pin_serves_tls(
    gateway_factory: GatewayFactory, tmp_path: Path, certs: Certs
) -> None:
    p12 = _pkcs12(tmp_path, certs, b"1234")
    pin = _secret(tmp_path / "pin", "1234\n")
    gw = await gateway_factory(**_implicit({"pkcs12": str(p12), "pin_file": str(pin)}))
    assert await _handshake(gw.port, certs) == "TLSv1.3"


def _check(tmp_path: Path, document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(document))
    return subprocess.run(
        [SMTPGATE, "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_wrong_pin_is_a_clear_error_tried_once(tmp_path: Path, certs: Certs) -> None:
    p12 = _pkcs12(tmp_path, certs, b"1234")
    pin = _secret(tmp_path / "pin", "4321")
    result = _check(tmp_path, _implicit({"pkcs12": str(p12), "pin_file": str(pin)}))
    assert result.returncode == 1
    assert (
        f"certificates[0].pin_file: certificate 'gw': the PIN does not open {p12} (tried once"
        in result.stderr
    )
    assert "4321" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_keys_readable_by_others_are_refused(tmp_path: Path, certs: Certs, mode: int) -> None:
    key = tmp_path / "gw.key"
    key.write_bytes(certs.key_file.read_bytes())
    key.chmod(mode)
    result = _check(tmp_path, _implicit({"cert": str(certs.cert_file), "key": str(key)}))
    assert result.returncode == 1
    assert (
        f"certificates[0].key: certificate 'gw': {key} holds a private key and is readable "
        f"by other users (mode {mode:04o}); run: chmod 600 {key}"
    ) in result.stderr


async def test_protocol_floor_default_refuses_tls_1_1(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        **_implicit({"cert": str(certs.cert_file), "key": str(certs.key_file)})
    )
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(gw.port, certs, maximum=ssl.TLSVersion.TLSv1_1)
    assert await _handshake(gw.port, certs, maximum=ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


async def test_tls_1_1_only_when_configured(gateway_factory: GatewayFactory, certs: Certs) -> None:
    gw = await gateway_factory(
        **_implicit(
            {"cert": str(certs.cert_file), "key": str(certs.key_file)},
            protocols=["TLSv1.1", "TLSv1.2", "TLSv1.3"],
            cipher_strength="medium",
        )
    )
    assert await _handshake(gw.port, certs, maximum=ssl.TLSVersion.TLSv1_1) == "TLSv1.1"


def test_protocols_must_be_contiguous(tmp_path: Path, certs: Certs) -> None:
    result = _check(
        tmp_path,
        _implicit(
            {"cert": str(certs.cert_file), "key": str(certs.key_file)},
            protocols=["TLSv1", "TLSv1.3"],
        ),
    )
    assert result.returncode == 1
    assert "tls.protocols: protocols must be a contiguous range" in result.stderr


def test_certs_list_and_selfsigned(tmp_path: Path) -> None:
    subprocess.run(
        [
            SMTPGATE,
            "certs",
            "selfsigned",
            "soon",
            "--host",
            "gw.example.com",
            "--days",
            "10",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    assert oct((tmp_path / "soon.key").stat().st_mode & 0o777) == "0o600"
    document = _implicit({"cert": str(tmp_path / "soon.pem"), "key": str(tmp_path / "soon.key")})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(document))
    out = subprocess.run(
        [SMTPGATE, "certs", "list", "--config", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "gw: CN=gw.example.com" in out
    assert "SANs: gw.example.com" in out
    assert "expires within 30 days" in out
    facts = json.loads(
        subprocess.run(
            [SMTPGATE, "certs", "list", "--config", str(path), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    cert_pem, _ = self_signed("x.example", 1)
    assert facts[0]["expires_soon"] is True
    assert len(facts[0]["sha256"]) == 95  # 32 bytes as hex pairs with colons
    assert facts[0]["spki_pin"].endswith("=")
    assert cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")


@pytest.fixture(scope="module")
def client_certs(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> dict[str, Path]:
    """Client certificates: two from the gateway's CA, one from another CA."""
    directory = tmp_path_factory.mktemp("clients")
    files: dict[str, Path] = {}
    other = trustme.CA()
    for name, ca in (("alice", certs.ca), ("bob", certs.ca), ("mallory", other)):
        leaf = ca.issue_cert(f"{name}.clients.test")
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        files[name], files[f"{name}-key"] = cert, key
    files["ca"] = certs.ca_file
    return files


def _with_identity(certs: Certs, identity: object, **extra: Any) -> dict[str, Any]:
    document = _implicit({"cert": str(certs.cert_file), "key": str(certs.key_file)}, **extra)
    document["listeners"][0]["client_identity"] = identity
    return document


async def _mail_with_cert(port: int, certs: Certs, cert: Path | None, key: Path | None) -> bytes:
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="gw.test"
    )
    try:
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        writer.write(b"MAIL FROM:<a@x.example>\r\n")
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


async def _refused(port: int, certs: Certs, cert: Path | None, key: Path | None) -> bool:
    """True when the client is refused: a TLS alert, a close, or 530 at MAIL."""
    try:
        reply = await _mail_with_cert(port, certs, cert, key)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    return reply == b"" or reply.startswith(b"530 5.7.0")


async def test_client_identity_trusted(
    gateway_factory: GatewayFactory, certs: Certs, client_certs: dict[str, Path]
) -> None:
    gw = await gateway_factory(**_with_identity(certs, "trusted", ca_files=[str(certs.ca_file)]))
    alice = (client_certs["alice"], client_certs["alice-key"])
    assert (await _mail_with_cert(gw.port, certs, *alice)).startswith(b"250 ")
    assert await _refused(gw.port, certs, None, None)
    assert await _refused(gw.port, certs, client_certs["mallory"], client_certs["mallory-key"])


async def test_client_identity_exact_certificate(
    gateway_factory: GatewayFactory, certs: Certs, client_certs: dict[str, Path]
) -> None:
    document = _with_identity(certs, {"require_certificate": "alice"})
    document["certificates"].append({"name": "alice", "cert": str(client_certs["alice"])})
    gw = await gateway_factory(**document)
    alice = (client_certs["alice"], client_certs["alice-key"])
    assert (await _mail_with_cert(gw.port, certs, *alice)).startswith(b"250 ")
    # bob has a certificate from the same CA, but not the one required
    assert await _refused(gw.port, certs, client_certs["bob"], client_certs["bob-key"])


async def test_client_identity_issued_under_a_ca(
    gateway_factory: GatewayFactory, certs: Certs, client_certs: dict[str, Path]
) -> None:
    document = _with_identity(certs, {"require_certificate": "our-ca"})
    document["certificates"].append({"name": "our-ca", "cert": str(client_certs["ca"])})
    gw = await gateway_factory(**document)
    for name in ("alice", "bob"):
        pair = (client_certs[name], client_certs[f"{name}-key"])
        assert (await _mail_with_cert(gw.port, certs, *pair)).startswith(b"250 ")
    assert await _refused(gw.port, certs, client_certs["mallory"], client_certs["mallory-key"])


async def test_swaks_with_and_without_a_client_certificate(
    gateway_factory: GatewayFactory, certs: Certs, client_certs: dict[str, Path], swaks: str
) -> None:
    document = _with_identity(certs, "trusted", ca_files=[str(certs.ca_file)])
    document["listeners"][0]["security"] = "starttls"
    gw = await gateway_factory(**document)
    base = [swaks, "--server", f"127.0.0.1:{gw.port}", "--to", "alice@example.com", "--tls"]
    code, out = await run_tool(
        *base, "--tls-cert", str(client_certs["alice"]), "--tls-key", str(client_certs["alice-key"])
    )
    assert code == 0, out
    assert "250 2.0.0 Ok: queued as" in out
    code, out = await run_tool(*base)
    # The alert for the missing certificate ends the session, during the handshake or
    # (TLS 1.3) at the client's first command depending on timing; either way no mail.
    assert code != 0, out
    assert "queued as" not in out


@pytest.mark.parametrize("security", ["implicit-tls", "starttls"])
async def test_testssl_finds_no_weak_protocol_or_cipher(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path, security: str
) -> None:
    testssl = shutil.which("testssl") or shutil.which("testssl.sh")
    assert testssl, "testssl.sh is required (apt-get install testssl.sh); .ci/run installs it"
    document = _implicit({"cert": str(certs.cert_file), "key": str(certs.key_file)})
    document["listeners"][0]["security"] = security
    gw = await gateway_factory(**document)
    report = tmp_path / "testssl.json"
    starttls = ["--starttls", "smtp"] if security == "starttls" else []
    _, out = await run_tool(  # testssl's exit code counts findings; the report says which
        testssl,
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        *starttls,
        "--jsonfile-pretty",
        str(report),
        "-p",
        "-s",
        f"127.0.0.1:{gw.port}",
        timeout=240,
    )
    findings = {
        f["id"]: f["finding"]
        for section in ("protocols", "ciphers")
        for f in json.loads(report.read_text())["scanResult"][0][section]
    }
    for protocol in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert findings[protocol] == "not offered", (protocol, out)
    assert findings["TLS1_2"] == "offered"
    assert findings["TLS1_3"].startswith("offered")
    for weak in (
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
    ):
        assert findings[weak] == "not offered", (weak, out)


def _issue(certs: Certs, directory: Path) -> tuple[Path, Path, bytes]:
    leaf = certs.ca.issue_cert("gw.test", "127.0.0.1")
    cert, key = directory / "live.pem", directory / "live.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    return (
        cert,
        key,
        x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
            serialization.Encoding.DER
        ),
    )


async def _peer_certificate(
    port: int, certs: Certs
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="gw.test"
    )
    assert (await reader.readline()).startswith(b"220 ")
    return writer.get_extra_info("ssl_object").getpeercert(binary_form=True), reader, writer


async def test_smtpgate_reload_swaps_the_certificate_and_live_sessions_go_on(
    gateway_process: Any, sink: Any, certs: Certs, tmp_path: Path
) -> None:
    cert, key, first = _issue(certs, tmp_path)
    gw = gateway_process(
        sink.port,
        listeners=[{"name": "mx", "address": "x", "security": "implicit-tls", "certificate": "gw"}],
        certificates=[{"name": "gw", "cert": str(cert), "key": str(key)}],
        gateway={"workers": 2},
    )
    seen, reader, writer = await _peer_certificate(gw.port, certs)
    assert seen == first
    _, _, second = _issue(certs, tmp_path)  # new files at the same paths
    result = await run_tool(SMTPGATE, "reload", "--config", str(gw.config_path))
    assert result[0] == 0, result[1]
    await asyncio.sleep(0.5)
    for _ in range(8):  # whichever worker accepts: the reload reached every one
        seen_now, _, writer2 = await _peer_certificate(gw.port, certs)
        writer2.close()
        assert seen_now == second != first
    writer.write(b"NOOP\r\n")  # the session that started before the reload goes on
    assert await asyncio.wait_for(reader.readline(), 5) == b"250 2.0.0 Ok\r\n"
    writer.close()


async def test_changed_certificate_files_are_noticed(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    cert, key, first = _issue(certs, tmp_path)
    gw = await gateway_factory(**_implicit({"cert": str(cert), "key": str(key)}))
    reloader = gw.gateway.reloader
    assert reloader.reload(only_changed=True) == []  # nothing changed yet
    await asyncio.sleep(0.01)
    _, _, second = _issue(certs, tmp_path)
    os.utime(cert, (time.time() + 5, time.time() + 5))
    assert reloader.reload(only_changed=True) == ["gw"]  # what the watcher calls
    seen, _, writer = await _peer_certificate(gw.port, certs)
    writer.close()
    assert seen == second != first


async def test_client_identity_by_spki_pin(
    gateway_factory: GatewayFactory, certs: Certs, client_certs: dict[str, Path]
) -> None:
    alice_pin = spki_pin(x509.load_pem_x509_certificate(client_certs["alice"].read_bytes()))
    gw = await gateway_factory(
        **_with_identity(certs, {"require_spki_pin": alice_pin}, ca_files=[str(certs.ca_file)])
    )
    alice = (client_certs["alice"], client_certs["alice-key"])
    assert (await _mail_with_cert(gw.port, certs, *alice)).startswith(b"250 ")
    assert await _refused(gw.port, certs, client_certs["bob"], client_certs["bob-key"])


async def test_auth_works_on_an_implicit_tls_listener(
    gateway_factory: GatewayFactory, sink: Any, certs: Certs, tmp_path: Path
) -> None:
    config = auth_config(tmp_path, certs)
    config["listeners"][0]["security"] = "implicit-tls"
    config["send_connectors"][0]["deliver"]["smarthost"]["port"] = sink.port
    gw = await gateway_factory(**config)

    def login() -> None:
        context = ssl.create_default_context(cafile=str(certs.ca_file))
        with smtplib.SMTP_SSL("127.0.0.1", gw.port, context=context, timeout=30) as client:
            client.login("alice", PASSWORD)
            client.sendmail("alice@example.com", ["x@foreign.example"], b"Subject: t\r\n\r\nx\r\n")

    await asyncio.to_thread(login)
    [(meta, _)] = await sink.wait_for(1)
    assert meta["recipients"] == ["x@foreign.example"]


def test_explain_shows_the_client_certificate(tmp_path: Path, certs: Certs) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(_implicit({"cert": str(certs.cert_file), "key": str(certs.key_file)}))
    )
    out = subprocess.run(
        [
            SMTPGATE,
            "policy",
            "explain",
            "--config",
            str(path),
            "--client-ip",
            "192.0.2.1",
            "--client-certificate",
            "CN=mx.partner.example",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "client cert:  CN=mx.partner.example (verified by the listener)" in out


async def test_client_identity_listener_refuses_mail_in_the_clear(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    document = _with_identity(certs, "trusted", ca_files=[str(certs.ca_file)])
    document["listeners"][0]["security"] = "starttls"
    gw = await gateway_factory(**document)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await reader.readline()
    writer.write(b"EHLO client.test\r\n")
    while (await reader.readline())[3:4] == b"-":
        pass
    writer.write(b"MAIL FROM:<a@x.example>\r\n")
    assert (await reader.readline()).startswith(b"530 5.7.0")
    writer.close()
