"""Console sessions: who is logged in, their CSRF token, the idle timeout.

Sessions live in the API process's memory (one per login; a restart logs
everyone out, which is what an administrator expects from a restarted
gateway). The cookie carries 256 random bits and nothing else; every form
that changes something carries the session's CSRF token (a hidden field, or
the ``X-CSRF-Token`` header htmx sends), compared in constant time. A
session unused for ``idle`` seconds is gone. The clock is a parameter.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

from smtpgate.admin.accounts import User

COOKIE = "smtpgate_console"
IDLE = 900.0  # seconds: a session unused for longer must log in again
MAX_SESSIONS = 1000  # beyond this the least recently used one goes


@dataclass
class Session:
    token: str
    user: User
    csrf: str
    last_seen: float
    credential: str = ""  # the password hash at login: a changed password ends the session

    def csrf_ok(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(self.csrf, offered)


@dataclass
class Sessions:
    idle: float = IDLE
    by_token: dict[str, Session] = field(default_factory=dict)

    def create(self, user: User, now: float, credential: str = "") -> Session:
        if len(self.by_token) >= MAX_SESSIONS:
            oldest = min(self.by_token.values(), key=lambda s: s.last_seen)
            del self.by_token[oldest.token]
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        session = Session(token, user, csrf, now, credential)
        self.by_token[session.token] = session
        return session

    def get(self, token: str | None, now: float) -> Session | None:
        """The live session for a cookie, touched; None when unknown or idle too long."""
        session = self.by_token.get(token or "")
        if session is None:
            return None
        if now - session.last_seen > self.idle:
            del self.by_token[session.token]
            return None
        session.last_seen = now
        return session

    def drop(self, token: str | None) -> None:
        self.by_token.pop(token or "", None)

    def drop_user(self, name: str) -> None:
        """Log a user out everywhere (deleted, or password changed)."""
        for token in [t for t, s in self.by_token.items() if s.user.name == name]:
            del self.by_token[token]
