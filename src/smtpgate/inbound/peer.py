"""Facts about the peer of a TLS session: the cipher summary for the
``Received:`` header and the client certificate the listener verified."""

from __future__ import annotations

import asyncio
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from smtpgate.tls.certificates import spki_pin


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def tls_summary(transport: asyncio.BaseTransport) -> str | None:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)"`` for the Received header."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if not cipher:
        return str(ssl_object.version())
    return f"{ssl_object.version()} {cipher[0]} ({cipher[2]} bits)"


def client_certificate(der: bytes, pin: str | None, spki: str | None) -> tuple[str, str] | str:
    """(subject, "subject (sha256 …)") for an accepted certificate, or its SHA-256
    when a required fingerprint or public-key pin does not match."""
    certificate = x509.load_der_x509_certificate(der)
    digest = certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    if (pin is not None and digest != pin) or (spki is not None and spki_pin(certificate) != spki):
        return digest
    subject = certificate.subject.rfc4514_string()
    return subject, f"{subject} (sha256 {digest})"
