"""Helpers of the MTA-STS, DANE and TLSRPT tests (issue 18).

* ``start_https``: a real HTTPS server on 127.0.0.1 (asyncio, a trustme
  certificate) serving fixed responses by path and recording each request.
* ``issue``: a trustme leaf for some names, as PEM files.
* ``setup``: the pieces of a direct delivery to ``example.com``: the test DNS
  server (MX ``mx.example.com`` → 127.0.0.1, and what the test adds), a
  "next hop" gateway with a STARTTLS listener presenting a chosen
  certificate and relaying to the sink, and the sending gateway delivering
  by MX to it, trusting the trustme CA (``tls.ca_files``).
"""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from smtpgate.queue.store import Filters, QueueStore
from tests.conftest import Certs, GatewayFactory, GatewayHandle, SinkHandle
from tests.dnsserver import DnsServer, start_dns

POLICY_PATH = "/.well-known/mta-sts.txt"
Response = tuple[int, dict[str, str], bytes]


@dataclass
class Https:
    port: int
    server: asyncio.Server
    responses: dict[str, Response]
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    def close(self) -> None:
        self.server.close()


async def start_https(cert: Path, key: Path, responses: dict[str, Response]) -> Https:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    handle: Https

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            handle.requests.append((method, path, headers, body))
            status, extra, payload = handle.responses.get(path, (404, {}, b"not found"))
            fields = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(payload)}\r\n"
                f"Connection: close\r\n{fields}\r\n".encode()
                + payload
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    handle = Https(server.sockets[0].getsockname()[1], server, responses)
    return handle


def issue(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    """A leaf for ``names`` signed by ``ca``: (chain file, key file)."""
    leaf = ca.issue_cert(*names)
    stem = names[0].replace("*", "star")
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    with cert.open("wb") as out:
        for blob in leaf.cert_chain_pems:
            out.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def spki_sha256(cert: Path) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = loaded.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


def policy_response(text: bytes) -> Response:
    return (200, {"Content-Type": "text/plain"}, text)


def send(port: int, to: str = "alice@example.com") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("bob@example.org", [to], b"Subject: t\r\n\r\nx\r\n")


def recipient_state(data_dir: Path) -> tuple[str, str]:
    store = QueueStore(data_dir / "queue")
    try:
        [message] = [m for m in store.list(Filters()) if m.sender]
    finally:
        store.close()
    return message.recipients[0].state, message.recipients[0].last_reply or ""


async def wait_state(data_dir: Path, wanted: str, timeout: float = 10) -> tuple[str, str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            state, reply = recipient_state(data_dir)
        except ValueError:
            state, reply = "", ""
        if state == wanted or asyncio.get_running_loop().time() > deadline:
            return state, reply
        await asyncio.sleep(0.1)


@dataclass
class Setup:
    dns: DnsServer
    dns_port: int
    hop: GatewayHandle
    sender: GatewayHandle
    sender_dir: Path


async def start_dns_for(
    records: dict[tuple[str, str], list[str]], secure: tuple[str, ...] = ()
) -> tuple[DnsServer, int]:
    base = {("example.com", "MX"): ["10 mx.example.com."], ("mx.example.com", "A"): ["127.0.0.1"]}
    return await start_dns({**base, **records}, secure)


async def start_pair(
    factory: GatewayFactory,
    sink: SinkHandle,
    certs: Certs,
    tmp_path: Path,
    dns_port: int,
    hop_cert: tuple[Path, Path],
    outbound_security: dict[str, Any],
    *,
    hop_extra: dict[str, Any] | None = None,
    mx_domains: tuple[str, ...] = ("example.com",),
    **sender_extra: Any,
) -> tuple[GatewayHandle, GatewayHandle, Path]:
    """The next hop (gw0, STARTTLS with ``hop_cert``) and the sender (gw1), which
    delivers to ``mx_domains`` by MX."""
    hop = await factory(
        spoof_detection=False,
        listeners=[
            {"name": "mx", "address": "127.0.0.1:0", "security": "starttls", "certificate": "mx"}
        ],
        certificates=[{"name": "mx", "cert": str(hop_cert[0]), "key": str(hop_cert[1])}],
        **(hop_extra or {}),
    )
    sender = await factory(
        spoof_detection=False,
        gateway={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
        tls={"ca_files": [str(certs.ca_file)]},
        outbound_security=outbound_security,
        send_connectors=[
            {
                "name": "mx",
                "security": "starttls",
                "deliver": {"dns": {"port": hop.port}},
                "namespaces": [{"sender": "*", "recipient": d} for d in mx_domains],
            },
            {
                "name": "to-sink",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
                "namespaces": [{"sender": "*", "recipient": "example.org"}],
            },
        ],
        **sender_extra,
    )
    return hop, sender, tmp_path / "gw1"
