"""``smtpgate dkim keygen DOMAIN SELECTOR``: a DKIM signing key and its DNS record.

Writes an RSA-2048 private key (PKCS#1 PEM, what dkimpy reads) to
``DIR/DOMAIN.SELECTOR.key``, created 0600 and never overwritten, and prints
the TXT record to publish (RFC 6376 §3.6.1), its value split into strings of
at most 255 octets as zone files need. The key is then named in
``sender_auth.dkim_signing`` (``key_file``).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from smtpgate.config.schema import DkimSigning

KEY_BITS = 2048
TXT_STRING = 255  # RFC 1035 §3.3.14: one character-string is at most 255 octets


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    actions = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = actions.add_parser(
        "keygen", help="write an RSA-2048 key (0600) and print its DNS TXT record"
    )
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("selector", metavar="SELECTOR")
    keygen.add_argument("--out", type=Path, default=Path("."), help="directory (default: .)")


def run(args: argparse.Namespace) -> int:
    try:
        entry = DkimSigning.model_validate(
            {"domain": args.domain, "selector": args.selector, "key_file": "x"}
        )
    except ValueError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 2
    path = args.out / f"{entry.domain}.{entry.selector}.key"
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"smtpgate: cannot create {path}: {exc.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    print(f"key written to {path} (mode 0600); name it in sender_auth.dkim_signing:")
    print(f"  - {{domain: {entry.domain}, selector: {entry.selector}, key_file: {path}}}")
    print("publish this DNS record:")
    print(txt_record(entry.domain, entry.selector, key.public_key()))
    return 0


def txt_record(domain: str, selector: str, public: rsa.RSAPublicKey) -> str:
    """``SELECTOR._domainkey.DOMAIN. IN TXT "v=DKIM1; k=rsa; p=..."`` (split)."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    value = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    strings = " ".join(f'"{value[i : i + TXT_STRING]}"' for i in range(0, len(value), TXT_STRING))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"
