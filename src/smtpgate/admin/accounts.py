"""Console administrators: accounts, password hashing, login checks and throttling.

Passwords are hashed with argon2id (``argon2-cffi``'s defaults, RFC 9106's
second recommended set), never stored or logged in clear. Two roles: *admin*
may do everything, *auditor* may only read. A login attempt for an unknown
user still runs one hash verification, so the reply time does not say
whether the name exists. Failed logins are throttled per client address
with the same rules (and the same ``limits`` settings) as SMTP AUTH.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from smtpgate.config.schema import Limits
from smtpgate.config.store import ConfigStore
from smtpgate.errors import AdminError, Conflict, NotFound
from smtpgate.policy.auth import AuthThrottle

Role = Literal["admin", "auditor"]
ROLES: tuple[str, ...] = get_args(Role)
MIN_PASSWORD = 12  # characters; a console password guards every setting
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"

_hasher = PasswordHasher()
_DUMMY = _hasher.hash("not a password anyone has")


@dataclass(frozen=True)
class User:
    name: str
    role: Role

    @property
    def actor(self) -> str:
        """The audit log's name for this user."""
        return f"user:{self.name}"

    @property
    def may_change(self) -> bool:
        return self.role == "admin"


def _check_name(name: str) -> None:
    import re  # noqa: PLC0415

    if not re.fullmatch(NAME_PATTERN, name):
        raise AdminError(
            f"{name!r} is not a user name: letters, digits and . _ @ - (at most 64), "
            "starting with a letter or digit"
        )


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AdminError(f"the password must have at least {MIN_PASSWORD} characters")


def role_of(role: str) -> Role:
    """A stored role; an unknown one (edited by hand) reads as the weaker auditor."""
    return role if role in ROLES else "auditor"  # type: ignore[return-value]


def _check_role(role: str) -> Role:
    if role not in ROLES:
        raise AdminError(f"{role!r} is not a role: use one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def create_user(store: ConfigStore, name: str, password: str, role: str, actor: str) -> None:
    _check_name(name)
    _check_password(password)
    checked = _check_role(role)
    digest = _hasher.hash(password)
    with store.transaction() as connection:
        if not store.add_user(connection, name, digest, checked, actor):
            raise Conflict(f"a user named {name!r} exists already")
        store.record(connection, actor, "user.create", f"{name} ({checked})")


def set_password(store: ConfigStore, name: str, password: str, actor: str) -> None:
    _check_password(password)
    digest = _hasher.hash(password)
    with store.transaction() as connection:
        if not store.update_user(connection, name, password_hash=digest):
            raise NotFound(f"no user named {name!r}")
        store.record(connection, actor, "user.passwd", name)


def set_role(store: ConfigStore, name: str, role: str, actor: str) -> None:
    checked = _check_role(role)
    with store.transaction() as connection:
        if not store.update_user(connection, name, role=checked):
            raise NotFound(f"no user named {name!r}")
        store.record(connection, actor, "user.role", f"{name} ({checked})")


def delete_user(store: ConfigStore, name: str, actor: str) -> None:
    with store.transaction() as connection:
        if not store.remove_user(connection, name):
            raise NotFound(f"no user named {name!r}")
        store.record(connection, actor, "user.delete", name)


def list_users(store: ConfigStore) -> list[dict[str, str | float]]:
    return [
        {"name": name, "role": role, "created_at": at, "created_by": by}
        for name, role, at, by in store.user_list()
    ]


def verify(store: ConfigStore, name: str, password: str) -> User | None:
    """The user, when ``password`` is theirs; None otherwise (same cost either way)."""
    found = store.user(name)
    digest = found[1] if found else _DUMMY
    try:
        _hasher.verify(digest, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if found is None:
        return None
    if _hasher.check_needs_rehash(digest):  # parameters raised since: upgrade quietly
        with store.transaction() as connection:
            store.update_user(connection, name, password_hash=_hasher.hash(password))
    return User(found[0], _check_role(found[2]))


@dataclass
class LoginThrottle:
    """Failed console logins per client address, as SMTP AUTH counts them."""

    limits: Limits = field(default_factory=Limits)
    throttle: AuthThrottle = field(init=False)

    def __post_init__(self) -> None:
        self.throttle = AuthThrottle(self.limits)

    def locked(self, ip: str, now: float) -> bool:
        return self.throttle.locked(ip, now)

    def failed(self, ip: str, now: float) -> float:
        """Count a failure; how long to wait before answering it."""
        return self.throttle.record_failure(ip, now)

    def succeeded(self, ip: str) -> None:
        self.throttle.record_success(ip)
