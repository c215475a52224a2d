"""SSL contexts: the protocol floor and cipher strength, exactly.

``tls.protocols`` sets ``minimum_version``/``maximum_version`` (a contiguous
range; SSLv2/SSLv3 cannot be chosen). ``tls.cipher_strength`` maps to these
OpenSSL cipher lists for TLS 1.2 and below (TLS 1.3 suites are all AEAD
with 128 or 256-bit keys and are always allowed):

* ``high``: ``HIGH:!aNULL:!eNULL:!MD5:!RC4:!3DES:!DES:!EXPORT:!PSK:!SRP:!CAMELLIA:!ARIA``
* ``medium``: ``HIGH:MEDIUM:!aNULL:!eNULL:!MD5:!RC4:!3DES:!DES:!EXPORT:!PSK:!SRP``
* ``any``: ``ALL:!aNULL:!eNULL:!LOW:!EXPORT:!MD5:!RC4:!3DES:!DES:!PSK:!SRP``

Whatever the level, a context whose ciphers include anything below 128 bits
is refused (never NULL, EXPORT, RC4, DES, 3DES or anonymous). TLS 1.0/1.1
need OpenSSL's security level 0, which is set only when they are chosen.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from cryptography.hazmat.primitives.serialization import Encoding

from smtpgate.config.schema import TLS_ORDER, TlsVersion
from smtpgate.tls.certificates import Loaded, as_files, fingerprint, is_ca

_FORBIDDEN = "!aNULL:!eNULL:!MD5:!RC4:!3DES:!DES:!EXPORT:!PSK:!SRP"
CIPHERS = {
    "high": f"HIGH:{_FORBIDDEN}:!CAMELLIA:!ARIA",
    "medium": f"HIGH:MEDIUM:{_FORBIDDEN}",
    "any": f"ALL:!LOW:{_FORBIDDEN}",
}
_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
MIN_BITS = 128


def _secure(context: ssl.SSLContext, protocols: Sequence[TlsVersion], strength: str) -> None:
    ordered = sorted(protocols, key=TLS_ORDER.index)
    context.minimum_version = _VERSIONS[ordered[0]]
    context.maximum_version = _VERSIONS[ordered[-1]]
    legacy = ordered[0] in ("TLSv1", "TLSv1.1")
    context.set_ciphers(CIPHERS[strength] + (":@SECLEVEL=0" if legacy else ""))
    weakest = min(c["strength_bits"] for c in context.get_ciphers())
    if weakest < MIN_BITS:  # defence in depth: never below 128 bits, whatever OpenSSL adds
        raise ValueError(f"cipher list allows {weakest}-bit ciphers")
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE


def server_context(
    loaded: Loaded,
    protocols: Sequence[TlsVersion] = ("TLSv1.2", "TLSv1.3"),
    strength: str = "high",
) -> ssl.SSLContext:
    """A listener's context with its server identity."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _secure(context, protocols, strength)
    with as_files(loaded) as (chain, key):
        context.load_cert_chain(chain, key)
    return context


def require_client_identity(
    context: ssl.SSLContext, identity: str | Loaded, ca_files: Sequence[str]
) -> str | None:
    """Ask for a client certificate; returns the SHA-256 the client must match, if any.

    ``trusted``: the chain must verify against the system store and
    ``ca_files``. A named CA: the chain must reach it (it may be an
    intermediate: partial chains are allowed). A named end certificate: it is
    the only trust anchor, and after the handshake the client's certificate
    must be exactly it (the returned fingerprint).
    """
    context.verify_mode = ssl.CERT_REQUIRED
    if identity == "trusted":
        context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        for path in ca_files:
            context.load_verify_locations(cafile=path)
        return None
    assert isinstance(identity, Loaded)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    anchor = identity.chain[0]
    context.load_verify_locations(cadata=anchor.public_bytes(Encoding.PEM).decode("ascii"))
    return None if is_ca(anchor) else fingerprint(anchor)


def client_context(
    minimum: TlsVersion = "TLSv1.2",
    strength: str = "high",
    *,
    validate: bool = False,
    ca_files: Sequence[str] = (),
    identity: Loaded | None = None,
) -> ssl.SSLContext:
    """A context for delivery: the policy's floor and strength, chain validation
    when asked (names are checked separately, SAN first), and a client identity."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _secure(
        context, [v for v in TLS_ORDER if TLS_ORDER.index(v) >= TLS_ORDER.index(minimum)], strength
    )
    context.check_hostname = False
    if validate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        for path in ca_files:
            context.load_verify_locations(cafile=path)
    else:
        context.verify_mode = ssl.CERT_NONE
    if identity is not None:
        with as_files(identity) as (chain, key):
            context.load_cert_chain(chain, key)
    return context
