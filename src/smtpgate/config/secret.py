"""Secrets at rest: passwords encrypted with a key kept in ``data_dir``.

Passwords (SMTP AUTH credentials, later smarthost passwords and certificate
PINs) must be recoverable, since the manual's *Send credentials* mails them
to the administrator, so they are encrypted, not hashed: Fernet (AES-128-CBC
with HMAC-SHA256, from ``cryptography``) with a key in
``data_dir/keys/secret.key``, created on first use with mode 0600 in a 0700
directory. Encrypted values are written ``enc:v1:<token>``. A secret's clear
text never appears in logs, errors or exports: it lives in ``SecretStr``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

from smtpgate.config.schema import Credential
from smtpgate.config.validate import private_file_problem
from smtpgate.errors import ConfigError, FieldProblem
from smtpgate.files import private_dir

PREFIX = "enc:v1:"


def key_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "secret.key"


def load_key(data_dir: Path, *, create: bool) -> Fernet:
    """The data directory's key; created (0600) when ``create`` and missing."""
    path = key_path(data_dir)
    try:
        return Fernet(path.read_bytes().strip())
    except FileNotFoundError:
        if not create:
            raise ConfigError(
                [
                    FieldProblem(
                        "gateway.data_dir",
                        f"no secret key at {path}; encrypt a "
                        "password first with `smtpgate credentials encrypt`",
                    )
                ]
            ) from None
    except ValueError:
        raise ConfigError([FieldProblem("gateway.data_dir", f"{path} is not a key")]) from None
    private_dir(path.parent)  # data_dir too, when this is the first thing in it
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key + b"\n")
    return Fernet(key)


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
