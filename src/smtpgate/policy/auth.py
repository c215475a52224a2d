"""SMTP AUTH decisions: who a user is, and when a client must be slowed down.

* User names are unique across all connection profiles; a user belongs to
  the profile whose credentials list it. Credentials of a disabled or
  blocked profile never authenticate.
* Passwords are compared in constant time, also for unknown users.
* Failures are counted per client IP: each failure is answered after a
  delay (``auth_failure_delay`` times the failures so far, at most 5 s); after
  ``max_auth_failures`` within ``auth_failure_window`` seconds the address
  is locked out for ``auth_lockout`` seconds and gets ``454 4.7.0``.

Pure: the clock is a parameter.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import SecretStr

from smtpgate.config.schema import Limits
from smtpgate.policy.profile import Profile
from smtpgate.proto.replies import Reply

LOCKED_OUT = Reply.of(454, "4.7.0", "Too many failed authentication attempts, try again later")
BAD_CREDENTIALS = Reply.of(535, "5.7.8", "Authentication credentials invalid")
AUTHENTICATED = Reply.of(235, "2.7.0", "Authentication successful")
_DUMMY = b"\x00" * 32


@dataclass(frozen=True)
class CredentialIndex:
    """User name → (profile name, password)."""

    users: dict[str, tuple[str, SecretStr]]

    def verify(self, username: str, password: str) -> str | None:
        """The owning profile's name when the password is right, else None."""
        entry = self.users.get(username)
        expected = entry[1].get_secret_value().encode() if entry else _DUMMY
        ok = hmac.compare_digest(expected, password.encode("utf-8", "surrogateescape"))
        return entry[0] if entry and ok else None


def user_profile(
    profiles: Mapping[str, Profile], owner: str | None, auth_enabled: Set[str]
) -> tuple[Profile | None, str]:
    """The profile a user with the right password authenticates into, or None and
    why not: the profile must exist, have SMTP AUTH enabled and not be blocked.
    The session handler and ``policy explain`` both decide with this."""
    profile = profiles.get(owner) if owner else None
    if owner is None or profile is None:
        return None, "unknown user or wrong password: 535 5.7.8"
    if owner not in auth_enabled:
        return None, f"{profile.label} has SMTP AUTH disabled: 535 5.7.8"
    if profile.relay == "blocked":
        return None, f"{profile.label} is blocked: 535 5.7.8"
    return profile, f"authenticated into {profile.label}"


class Throttle(Protocol):
    """Failed AUTH attempts per client IP: this process's (:class:`AuthThrottle`)
    or every worker's (``inbound.throttle.SharedAuthThrottle``)."""

    def locked(self, ip: str, now: float) -> bool: ...

    def record_failure(self, ip: str, now: float) -> float: ...

    def record_success(self, ip: str) -> None: ...


@dataclass
class AuthThrottle:
    """Failed AUTH attempts per client IP (state, no I/O)."""

    limits: Limits
    failures: dict[str, list[float]] = field(default_factory=dict)
    locked_until: dict[str, float] = field(default_factory=dict)

    def locked(self, ip: str, now: float) -> bool:
        until = self.locked_until.get(ip)
        if until is None:
            return False
        if now >= until:
            del self.locked_until[ip]
            self.failures.pop(ip, None)
            return False
        return True

    def record_failure(self, ip: str, now: float) -> float:
        """Count a failure; returns how long to wait before answering it."""
        window = self.limits.auth_failure_window
        recent = [t for t in self.failures.get(ip, []) if now - t < window] + [now]
        self.failures[ip] = recent
        if len(recent) >= self.limits.max_auth_failures:
            self.locked_until[ip] = now + self.limits.auth_lockout
        return min(5.0, self.limits.auth_failure_delay * len(recent))

    def record_success(self, ip: str) -> None:
        self.failures.pop(ip, None)
