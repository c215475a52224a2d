"""Named certificates: loading (PEM or PKCS#12 with a PIN), checks, and facts.

Rules kept here:

* A private key (a key file, a PEM with the key inside, or a PKCS#12 file)
  must not be readable by other users: the gateway refuses it and says how
  to fix it, the Linux equivalent of the manual's key-permission warning.
* A PKCS#12 PIN is tried once per load and never in a loop: some tokens are
  destroyed after three wrong PINs. A wrong PIN is a clear configuration
  error naming the field; a file that needs a PIN when none is set says so.
* The key must be the certificate's (the same public key): a mismatched pair
  would only fail at the first handshake, naming nothing. ``check_configured``
  (``config check``, validate, apply) also refuses an expired certificate and
  warns 30 days ahead. Every problem names the certificate and its file.
* Host names are matched by ``service_identity`` (RFC 6125 §6.4).
* ``describe`` gives what ``smtpgate certs list`` shows: subject, SANs,
  issuer, SHA-256 fingerprint, SPKI pin (base64 SHA-256 of the public key,
  as in RFC 7469) and expiry.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import (
    DNS_ID,
    CertificatePattern,
    DNSPattern,
    IPAddress_ID,
    SRVPattern,
    URIPattern,
    verify_service_identity,
)

from smtpgate.config.schema import Certificate, GatewayConfig
from smtpgate.config.secret import load_key, read_secret
from smtpgate.config.validate import name_objects, private_file_problem
from smtpgate.errors import ConfigError, FieldProblem

EXPIRY_WARNING = dt.timedelta(days=30)


@dataclass(frozen=True)
class Loaded:
    """A certificate chain and key ready for ``ssl`` (PEM bytes)."""

    name: str
    chain: list[x509.Certificate]
    key_pem: bytes | None  # None: a certificate only (a CA or a pinned peer certificate)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


def key_permission_problem(path: Path) -> str | None:
    return private_file_problem(path, " holds a private key and")


def load(cert: Certificate, where: str, key: Fernet | None = None) -> Loaded:
    """Load one named certificate, or raise ConfigError naming the field and file."""
    if cert.pkcs12 is not None:
        return _load_pkcs12(cert, where, key)
    assert cert.cert is not None
    try:
        chain = x509.load_pem_x509_certificates(cert.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise _problem(f"{where}.cert", f"cannot load {cert.cert}: {exc}") from None
    key_file = cert.key or cert.cert
    key_field = f"{where}.{'key' if cert.key else 'cert'}"
    try:
        key_text = key_file.read_bytes()
    except OSError as exc:
        raise _problem(key_field, f"cannot read {key_file}: {exc.strerror}") from None
    if cert.key is None and b"PRIVATE KEY-----" not in key_text:
        return Loaded(cert.name, chain, None)  # a certificate without a key
    problem = key_permission_problem(key_file)
    if problem:
        raise _problem(key_field, problem)
    try:
        private = serialization.load_pem_private_key(key_text, password=None)
    except ValueError as exc:
        raise _problem(key_field, f"cannot load the key in {key_file}: {exc}") from None
    if not _pair(private, chain[0]):
        raise _problem(
            key_field,
            f"the key in {key_file} does not belong to the certificate in {cert.cert} "
            "(their public keys differ): name the key that was issued with it",
        )
    return Loaded(cert.name, chain, _pkcs8(private))


def _problem(path: str, message: str) -> ConfigError:
    return ConfigError([FieldProblem(path, message)])


def _pair(private: PrivateKeyTypes, leaf: x509.Certificate) -> bool:
    """Whether ``private`` is the key of ``leaf`` (the same SubjectPublicKeyInfo)."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    mine = private.public_key().public_bytes(*spki)
    return mine == leaf.public_key().public_bytes(*spki)


def _pkcs8(private: PrivateKeyTypes) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_pkcs12(cert: Certificate, where: str, key: Fernet | None) -> Loaded:
    assert cert.pkcs12 is not None
    problem = key_permission_problem(cert.pkcs12)
    if problem:
        raise _problem(f"{where}.pkcs12", problem)
    pin = b""
    if cert.pin is not None or cert.pin_file is not None:
        pin_field = f"{where}.pin_file" if cert.pin_file else f"{where}.pin"
        pin = read_secret(cert.pin, cert.pin_file, key, pin_field).get_secret_value().encode()
    try:
        private, leaf, extra = pkcs12.load_key_and_certificates(
            cert.pkcs12.read_bytes(), pin or None
        )  # one try, never a loop
    except ValueError as exc:
        raise _pkcs12_refused(cert, where, str(exc)) from None
    except OSError as exc:
        raise _problem(f"{where}.pkcs12", f"cannot read {cert.pkcs12}: {exc.strerror}") from None
    if private is None or leaf is None:
        raise _problem(f"{where}.pkcs12", f"{cert.pkcs12} holds no key and certificate")
    if not _pair(private, leaf):
        raise _problem(
            f"{where}.pkcs12", f"the key in {cert.pkcs12} does not belong to its certificate"
        )
    return Loaded(cert.name, [leaf, *extra], _pkcs8(private))


def _pkcs12_refused(cert: Certificate, where: str, reason: str) -> ConfigError:
    """Why a PKCS#12 file did not open: not PKCS#12, no PIN given, or a wrong PIN."""
    if "deserialize" in reason:  # cryptography: "Could not deserialize PKCS12 data"
        return _problem(f"{where}.pkcs12", f"cannot load {cert.pkcs12}: not a PKCS#12 file")
    if cert.pin is None and cert.pin_file is None:
        return _problem(
            f"{where}.pkcs12",
            f"{cert.pkcs12} needs a PIN to open: set pin_file (a 0600 file holding it) "
            "or pin (encrypted by `smtpgate credentials encrypt`)",
        )
    return _problem(
        f"{where}.pin_file" if cert.pin_file else f"{where}.pin",
        f"the PIN does not open {cert.pkcs12} (tried once: some tokens are destroyed "
        "after three wrong PINs, so check it before trying again)",
    )


@contextmanager
def as_files(loaded: Loaded) -> Iterator[tuple[str, str]]:
    """The chain and key as private temporary files, for ``load_cert_chain``."""
    with tempfile.TemporaryDirectory(prefix="smtpgate-tls-") as directory:
        chain, key = Path(directory, "chain.pem"), Path(directory, "key.pem")
        assert loaded.key_pem is not None, "a certificate without a key cannot be an identity"
        for path, data in ((chain, loaded.chain_pem()), (key, loaded.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        yield str(chain), str(key)


def spki_pin(certificate: x509.Certificate) -> str:
    der = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return base64.b64encode(digest.finalize()).decode("ascii")


def fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(loaded: Loaded, now: dt.datetime) -> dict[str, object]:
    leaf = loaded.chain[0]
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in sans]
    except x509.ExtensionNotFound:
        names = []
    expires = leaf.not_valid_after_utc
    return {
        "name": loaded.name,
        "subject": leaf.subject.rfc4514_string(),
        "sans": names,
        "issuer": leaf.issuer.rfc4514_string(),
        "sha256": fingerprint(leaf),
        "spki_pin": spki_pin(leaf),
        "not_after": expires.isoformat(),
        "expires_soon": expires - now < EXPIRY_WARNING,
        "expired": expires < now,
        "chain": len(loaded.chain),
    }


def self_signed(host: str, days: int) -> tuple[bytes, bytes]:
    """A first certificate (EC P-256) for ``host``: (certificate PEM, key PEM)."""
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def load_all(
    certificates: list[Certificate], key_loader: Callable[[], Fernet]
) -> dict[str, Loaded]:
    """Every named certificate, loaded once; all problems reported together, each
    naming its certificate."""
    loaded: dict[str, Loaded] = {}
    problems: list[FieldProblem] = []
    needs_key = any(c.pin is not None for c in certificates)
    key = key_loader() if needs_key else None
    for i, cert in enumerate(certificates):
        try:
            loaded[cert.name] = load(cert, f"certificates[{i}]", key)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(name_objects(problems, {"certificates": certificates}))
    return loaded


def load_configured(config: GatewayConfig) -> dict[str, Loaded]:
    """The configuration's certificates, PINs decrypted with its data directory's key."""
    data_dir = config.gateway.data_dir
    return load_all(config.certificates, lambda: load_key(data_dir, create=False))


def check_configured(
    config: GatewayConfig, *, refuse_expired: bool = True, now: dt.datetime | None = None
) -> list[FieldProblem]:
    """What ``config check``, validate and apply add to the schema's checks: every
    certificate loads (files, key permissions, PINs, the key matches the
    certificate) and has not expired (RFC 5280 §4.1.2.5). Returns the warnings:
    certificates that expire within 30 days, and with ``refuse_expired`` off
    (``serve``, which keeps mail flowing) the expired ones too."""
    loaded = load_configured(config)
    expired, soon = validity(config, loaded, now or dt.datetime.now(dt.UTC))
    if expired and refuse_expired:
        raise ConfigError(expired)
    return expired + soon


def validity(
    config: GatewayConfig, loaded: dict[str, Loaded], now: dt.datetime
) -> tuple[list[FieldProblem], list[FieldProblem]]:
    """(expired, expiring within 30 days): each names the certificate and its file."""
    expired: list[FieldProblem] = []
    soon: list[FieldProblem] = []
    for i, cert in enumerate(config.certificates):
        item = loaded.get(cert.name)
        if item is None:
            continue
        field, file = ("pkcs12", cert.pkcs12) if cert.pkcs12 else ("cert", cert.cert)
        ends = item.chain[0].not_valid_after_utc
        when = f"{ends:%Y-%m-%d %H:%M} UTC"
        if ends <= now:
            message = f"the certificate in {file} expired on {when}: renew it"
            expired.append(FieldProblem(f"certificates[{i}].{field}", message))
        elif ends - now < EXPIRY_WARNING:
            days = (ends - now).days
            message = f"the certificate in {file} expires on {when}, in {days} days: renew it"
            soon.append(FieldProblem(f"certificates[{i}].{field}", message))
    return name_objects(expired, config), name_objects(soon, config)


def is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _reference_id(name: str) -> DNS_ID | IPAddress_ID | None:
    """The identity a name asks for: an IP address, or a host name (U- or A-labels;
    a trailing dot is dropped); None for a name that cannot be one."""
    try:
        return IPAddress_ID(name)
    except ValueError:
        pass
    try:
        return DNS_ID(name.rstrip("."))
    except (ValueError, UnicodeError):  # idna.IDNAError is a UnicodeError
        return None


def _common_names(certificate: x509.Certificate) -> list[CertificatePattern]:
    patterns: list[CertificatePattern] = []
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
        try:
            patterns.append(DNSPattern.from_bytes(text.encode("utf-8")))
        except CertificateError:
            continue  # an address or a malformed wildcard is no host-name pattern
    return patterns


def presented_identities(certificate: x509.Certificate) -> list[CertificatePattern]:
    """The identities a certificate presents: its subjectAltNames; the subject's CN
    only when there is no DNS-ID, SRV-ID or URI-ID among them (RFC 6125 §6.4.4)."""
    patterns = list(extract_patterns(certificate))
    if not any(isinstance(p, DNSPattern | SRVPattern | URIPattern) for p in patterns):
        patterns += _common_names(certificate)
    return patterns


def certificate_matches(der: bytes, names: Sequence[str]) -> bool:
    """Whether the certificate is valid for any of ``names`` (RFC 6125 §6.4: exact
    names and left-most-label wildcards, IDNs compared as A-labels, IP addresses as
    addresses); the matching is service_identity's."""
    try:
        patterns = presented_identities(x509.load_der_x509_certificate(der))
    except (CertificateError, ValueError):
        return False  # a malformed SAN or wildcard matches nothing
    for name in names:
        wanted = _reference_id(name)
        if wanted is None:
            continue
        try:
            verify_service_identity(patterns, [wanted], [])
        except (VerificationError, CertificateError):
            continue
        return True
    return False
