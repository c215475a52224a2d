"""Certificates and private files for configuration tests: issued by a trustme
CA, or self-signed with a chosen end of validity (expired, expiring soon)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def private(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to ``path`` with ``mode`` (0600: as a key must be)."""
    path.write_bytes(data)
    path.chmod(mode)
    return path


def issued(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    """(certificate, key) for ``NAME.test``, issued by ``ca``."""
    leaf = ca.issue_cert(f"{name}.test")
    cert = directory / f"{name}.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return cert, private(directory / f"{name}.key", leaf.private_key_pem.bytes())


def cn_only(
    common_name: str, not_after: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed certificate naming ``common_name`` only (no subjectAltName,
    which trustme always adds), valid until ``not_after``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=90))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def dated(directory: Path, name: str, not_after: dt.datetime) -> tuple[Path, Path]:
    """(certificate, key), self-signed, valid until ``not_after`` (past or future)."""
    certificate, key = cn_only(f"{name}.test", not_after)
    cert = directory / f"{name}.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert, private(directory / f"{name}.key", key_pem)
