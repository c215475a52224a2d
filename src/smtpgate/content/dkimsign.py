"""DKIM signing of mail from inside (RFC 6376), the gateway's last edit.

A message from a trusted client (relay rights from inside) whose From domain,
or failing that its envelope sender's domain, has a ``sender_auth.dkim_signing``
entry gets a ``DKIM-Signature`` on top, after every header field the gateway
itself adds (``gateway.on_message`` calls ``sign_outbound`` after the
scanners' verdicts are written). relaxed/relaxed canonicalisation (RFC 6376
§3.4.2, §3.4.4), rsa-sha256, dkimpy's default header list (RFC 6376 §5.4.1: From,
To, Subject, Date, Message-ID, ...), the fields readers rely on signed once
more than present (``OVERSIGNED``), so none can be added later.

The key is a PEM file only its owner can read (``smtpgate dkim keygen``;
``config check`` refuses one open to others) or the key of a named
certificate. dkimpy signs bytes: a message over ``sender_auth.max_message_bytes``
is sent unsigned and logged; so is one whose key cannot be loaded (a signing
failure never refuses or loses mail; the log names the field to fix).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import functools
from pathlib import Path

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from smtpgate.config.schema import DkimSigning, GatewayConfig
from smtpgate.config.validate import private_file_problem
from smtpgate.errors import ConfigError, FieldProblem
from smtpgate.observe.log import get_logger
from smtpgate.spool import SpooledBody
from smtpgate.tls.certificates import Loaded

log = get_logger("smtpgate.content.dkim")

CANONICALIZE = (b"relaxed", b"relaxed")
# Signed once more than present, so none can be added after signing (RFC 6376 §8.15).
OVERSIGNED = (
    b"from",
    b"sender",
    b"reply-to",
    b"subject",
    b"date",
    b"message-id",
    b"to",
    b"cc",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
)


def choose(config: GatewayConfig, head: bytes, sender: str) -> tuple[int, DkimSigning] | None:
    """The signing entry for the From domain (one From address), else for the
    envelope sender's domain; with its index in ``dkim_signing``."""
    entries = config.sender_auth.dkim_signing
    if not entries:
        return None
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    froms = email.utils.getaddresses([str(v) for v in parsed.get_all("From", [])])
    candidates = [a.rpartition("@")[2].strip().lower().rstrip(".") for _n, a in froms[:1]]
    if sender:
        candidates.append(sender.rpartition("@")[2].lower())
    for domain in candidates:
        for index, entry in enumerate(entries):
            if entry.domain == domain:
                return index, entry
    return None


def private_key(entry: DkimSigning, where: str, certificates: dict[str, Loaded]) -> bytes:
    """The entry's RSA key as PKCS#1 PEM (what dkimpy reads), or ConfigError naming
    ``where`` (a key readable by others is refused)."""
    if entry.key_file is not None:
        problem = private_file_problem(entry.key_file, " holds a private key and")
        if problem:
            raise ConfigError([FieldProblem(f"{where}.key_file", problem)])
        stat = entry.key_file.stat()
        return _rsa_pem(entry.key_file, stat.st_mtime_ns, stat.st_size, f"{where}.key_file")
    loaded = certificates.get(entry.certificate or "")
    if loaded is None or loaded.key_pem is None:
        raise ConfigError(
            [
                FieldProblem(
                    f"{where}.certificate", f"no certificate {entry.certificate!r} with a key"
                )
            ]
        )
    return _traditional(loaded.key_pem, f"{where}.certificate")


@functools.lru_cache(maxsize=32)
def _rsa_pem(path: Path, _mtime: int, _size: int, where: str) -> bytes:
    """Read once per version of the file (its mtime and size are the cache key)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError([FieldProblem(where, f"cannot read {path}: {exc.strerror}")]) from None
    return _traditional(text, where)


def _traditional(pem: bytes, where: str) -> bytes:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise ConfigError([FieldProblem(where, f"not a PEM private key: {exc}")]) from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 1024:
        raise ConfigError([FieldProblem(where, "DKIM signing needs an RSA key of 1024+ bits")])
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def signature(message: bytes, entry: DkimSigning, key: bytes) -> bytes:
    """The ``DKIM-Signature`` field (folded, CRLF-terminated) for ``message``."""
    signer = dkim.DKIM(message, linesep=b"\r\n")
    signer.add_frozen(OVERSIGNED)
    return bytes(
        signer.sign(
            entry.selector.encode("ascii"),
            entry.domain.encode("ascii"),
            key,
            canonicalize=CANONICALIZE,
        )
    )


async def sign_outbound(
    body: SpooledBody,
    sender: str,
    config: GatewayConfig,
    certificates: dict[str, Loaded],
    internal: bool,
) -> None:
    """Put a DKIM-Signature on top of a message from inside, when its domain signs."""
    if not internal or not config.sender_auth.dkim_signing:
        return
    head = body.head()
    chosen = choose(config, head, sender)
    if chosen is None:
        return
    index, entry = chosen
    where = f"sender_auth.dkim_signing[{index}]"
    limit = config.sender_auth.max_message_bytes
    if body.size > limit:
        log.warning(
            "not DKIM-signed: message too large",
            queue_id=body.queue_id,
            domain=entry.domain,
            size=body.size,
            limit=limit,
        )
        return
    try:
        field = await asyncio.to_thread(_sign, body, entry, where, certificates)
    except ConfigError as exc:
        log.error("not DKIM-signed: key unusable", queue_id=body.queue_id, error=str(exc))
        return
    except Exception as exc:  # dkimpy's errors: unsigned, never lost
        log.error("not DKIM-signed", queue_id=body.queue_id, error=repr(exc))
        return
    body.replace_head(field, 0)
    log.info("DKIM-signed", queue_id=body.queue_id, domain=entry.domain, selector=entry.selector)


def _sign(
    body: SpooledBody, entry: DkimSigning, where: str, certificates: dict[str, Loaded]
) -> bytes:
    key = private_key(entry, where, certificates)
    return signature(b"".join(body.chunks()), entry, key)
