"""DANE for SMTP (RFC 7672, RFC 6698): TLSA lookup and verification of the peer.

* Lookup: ``_PORT._tcp.MXHOST`` TLSA through the gateway's resolver. DANE
  applies only when the MX RRset and the TLSA RRset were both validated by
  the resolver (its AD bit, as Postfix trusts it): the resolver must be a
  local DNSSEC-validating one (``gateway.dns``), since the bit itself is not
  protected on the way. A TLSA lookup that fails (SERVFAIL, timeout) for a
  host whose MX was validated makes the host unusable (§2.2).
* Verification replaces the WebPKI: the handshake runs without chain
  validation and the chain the server presented is checked against the
  records. DANE-EE (3): the leaf matches; names and dates do not matter
  (§3.1.1). DANE-TA (2): a certificate of the presented chain matches, the
  chain from the leaf up to it verifies signature by signature, the leaf is
  within its validity period and is issued to the MX host name (§3.2.2).
  Selectors 0 (whole certificate) and 1 (SubjectPublicKeyInfo); matching
  types 0 (exact), 1 (SHA-256) and 2 (SHA-512).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import itertools
import ssl

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from smtpgate.dns import Resolver
from smtpgate.policy.tls import TlsaRecord
from smtpgate.policy.transport import DaneFact
from smtpgate.tls.certificates import certificate_matches

MAX_CHAIN = 10
MAX_RECORDS = 32
_DER = 2  # _ssl.ENCODING_DER


def parse_tlsa(text: str) -> TlsaRecord | None:
    """``"3 1 1 ab12..."`` as dnspython prints it; None when malformed."""
    parts = text.split()
    if len(parts) < 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    try:
        data = bytes.fromhex("".join(parts[3:]))
    except ValueError:
        return None
    usage, selector, matching = (int(p) for p in parts[:3])
    return TlsaRecord(usage, selector, matching, data)


async def tlsa_fact(resolver: Resolver, mx_secure: bool, host: str, port: int) -> DaneFact:
    """The DANE facts of one MX host (see the module's docstring)."""
    name = f"_{port}._tcp.{host}"
    if not mx_secure:
        return DaneFact("insecure", (), name)
    found = await resolver.records(name, "TLSA")
    if found.status == "temporary":
        return DaneFact("failed", (), name)
    if found.status != "ok":
        return DaneFact("none", (), name)
    if not found.secure:
        return DaneFact("insecure", (), name)
    records = tuple(r for r in map(parse_tlsa, found.values[:MAX_RECORDS]) if r is not None)
    return DaneFact("secure", records, name)


def peer_chain(ssl_object: ssl.SSLObject | None) -> list[bytes]:
    """The chain the server presented (DER, leaf first), unverified."""
    if ssl_object is None:
        return []
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)  # public from Python 3.13
    if getter is not None:
        chain = getter() or []
        return [c.public_bytes(_DER) for c in chain[:MAX_CHAIN]]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes | None:
    if selector == 0:
        return der
    if selector == 1:
        return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return None


def _matches(cert: x509.Certificate, der: bytes, record: TlsaRecord) -> bool:
    selected = _selected(cert, der, record.selector)
    if selected is None:
        return False
    if record.matching == 0:
        digest = selected
    elif record.matching == 1:
        digest = hashlib.sha256(selected).digest()
    elif record.matching == 2:
        digest = hashlib.sha512(selected).digest()
    else:
        return False
    return hmac.compare_digest(digest, record.data)


def _chain_to(certs: list[x509.Certificate], top: int) -> bool:
    try:
        for lower, upper in itertools.pairwise(certs[: top + 1]):
            lower.verify_directly_issued_by(upper)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_dane(
    chain: list[bytes], records: tuple[TlsaRecord, ...], names: tuple[str, ...]
) -> tuple[bool, str]:
    """Whether the presented ``chain`` satisfies one of ``records``, and how."""
    if not chain:
        return False, "the server presented no certificate"
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return False, "the server's certificate does not parse"
    for record in records:
        if record.usage == 3 and _matches(certs[0], chain[0], record):
            return True, f"DANE-EE {record.selector} {record.matching}"
    now = datetime.datetime.now(datetime.UTC)
    leaf = certs[0]
    for record in records:
        if record.usage != 2:
            continue
        for top, (cert, der) in enumerate(zip(certs, chain, strict=True)):
            if not _matches(cert, der, record) or not _chain_to(certs, top):
                continue
            if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
                return False, "the certificate is outside its validity period (DANE-TA)"
            if not certificate_matches(chain[0], names):
                return False, f"the certificate is not issued to {', '.join(names)} (DANE-TA)"
            return True, f"DANE-TA {record.selector} {record.matching}"
    return False, "no TLSA record matches the server's certificate chain"
