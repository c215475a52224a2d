"""Server SSL contexts for listeners.

The floor is TLS 1.2 and OpenSSL's ``HIGH`` cipher list without anonymous,
NULL, RC4, 3DES or export suites: nothing below 128 bits. The configurable
protocol set and cipher strength, PKCS#12 and client identities come with
the TLS work; this module is where they will live.
"""

from __future__ import annotations

import ssl
from pathlib import Path

CIPHERS = "HIGH:!aNULL:!eNULL:!MD5:!RC4:!3DES:!DES:!EXPORT:!PSK:!SRP:!CAMELLIA:!ARIA"


def server_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    """A server context from PEM files (leaf first, then chain)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(str(cert), str(key) if key else None)
    return context
