"""Secrets at rest: passwords encrypted with a key kept in ``data_dir``.

Passwords (SMTP AUTH credentials, later smarthost passwords and certificate
PINs) must be recoverable, since the manual's *Send credentials* mails them
to the administrator, so they are encrypted, not hashed: Fernet (AES-128-CBC
with HMAC-SHA256, from ``cryptography``) with a key in
``data_dir/keys/secret.key``, created on first use with mode 0600 in a 0700
directory. Encrypted values are written ``enc:v1:<token>``. A secret's clear
text never appears in logs, errors or exports: it lives in ``SecretStr``.

Peer gateways share one store, so they need one key: ``fingerprint`` names a
key without revealing it (the store records the cluster's, see
``smtpgate.admin.keys``), ``install_key`` puts a key copied from a peer in
place (``smtpgate cluster key import``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

from smtpgate.config.schema import Credential
from smtpgate.config.validate import private_file_problem
from smtpgate.errors import ConfigError, FieldProblem
from smtpgate.files import private_dir

PREFIX = "enc:v1:"
KEY_SHAPE = re.compile(rb"[A-Za-z0-9_-]{43}=")  # urlsafe base64 of 32 bytes


def key_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "secret.key"


def load_key(data_dir: Path, *, create: bool) -> Fernet:
    """The data directory's key; created (0600) when ``create`` and missing."""
    path = key_path(data_dir)
    found = read_key(data_dir)
    if found is not None:
        return Fernet(found)
    if not create:
        raise ConfigError(
            [
                FieldProblem(
                    "gateway.data_dir",
                    f"no secret key at {path}; encrypt a password first with "
                    "`smtpgate credentials encrypt`, or copy a peer's key with "
                    "`smtpgate cluster key import`",
                )
            ]
        )
    key = Fernet.generate_key()
    if not install_key(data_dir, key, replace=False):  # another process made one first
        return load_key(data_dir, create=False)
    return Fernet(key)


def read_key(data_dir: Path) -> bytes | None:
    """The data directory's key as written (``None`` if there is none yet)."""
    path = key_path(data_dir)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            [FieldProblem("gateway.data_dir", f"{path}: cannot read: {exc.strerror}")]
        ) from None
    key = parse_key(text)
    if key is None:
        raise ConfigError([FieldProblem("gateway.data_dir", f"{path} is not a key")])
    return key


def parse_key(text: bytes) -> bytes | None:
    """``text`` as a Fernet key (urlsafe base64 of 32 bytes), ``None`` if it is not one."""
    key = text.strip()
    if not KEY_SHAPE.fullmatch(key):
        return None
    try:
        Fernet(key)
    except (ValueError, binascii.Error):
        return None
    return key


def fingerprint(key: bytes) -> str:
    """A name for ``key`` that may be shown and stored: 16 hex digits of an HMAC
    keyed with the key, from which the key cannot be recovered."""
    raw = base64.urlsafe_b64decode(key.strip())
    return hmac.new(raw, b"smtpgate key fingerprint", hashlib.sha256).hexdigest()[:16]


def install_key(data_dir: Path, key: bytes, *, replace: bool) -> bool:
    """Write ``key`` as the data directory's key, atomically (a reader sees the
    old key or the new one, never a part) and 0600 in a 0700 directory. Without
    ``replace`` an existing key is kept and the result is False."""
    path = key_path(data_dir)
    private_dir(path.parent)  # data_dir too, when this is the first thing in it
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(key.strip() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if there is one: never two keys
            except FileExistsError:
                return False
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


def encrypt(key: Fernet, clear: str) -> str:
    return PREFIX + key.encrypt(clear.encode("utf-8")).decode("ascii")


def decrypt(key: Fernet, token: str, where: str) -> SecretStr:
    if not token.startswith(PREFIX):
        raise ConfigError([FieldProblem(where, "not an encrypted value (enc:v1:...)")])
    try:
        return SecretStr(key.decrypt(token[len(PREFIX) :].encode("ascii")).decode("utf-8"))
    except (InvalidToken, ValueError):
        raise ConfigError(
            [FieldProblem(where, "cannot be decrypted with this data directory's key")]
        ) from None


def read_password(credential: Credential, key: Fernet | None, where: str) -> SecretStr:
    """The clear password of a credential, from its file or its encrypted value."""
    return read_secret(credential.password, credential.password_file, key, where)


def read_secret(
    password: SecretStr | None, password_file: Path | None, key: Fernet | None, where: str
) -> SecretStr:
    """A secret from a private file (refused when others may read it) or an
    encrypted value."""
    if password_file is not None:
        problem = private_file_problem(password_file)
        if problem:
            raise ConfigError([FieldProblem(where, problem)])
        try:
            text = password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([FieldProblem(where, f"cannot read: {exc.strerror}")]) from None
        return SecretStr(text.rstrip("\r\n"))
    assert password is not None
    if key is None:
        raise ConfigError([FieldProblem(where, "encrypted, but no key is available")])
    return decrypt(key, password.get_secret_value(), where)
