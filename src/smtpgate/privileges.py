"""Running as root only as long as binding needs it: ``gateway.user``/``group``.

``smtpgate serve`` started as root binds its listeners (ports 25, 465, 587)
and the API socket, gives ``data_dir`` to the configured user (queue, keys,
store, spool, quarantine: everything under it), and then drops for good:
supplementary groups cleared, group, then user, then a check that root cannot
be taken back. This happens before the first connection is handled and
before the API child starts (it is started as that user too).

Serving as root with no ``gateway.user`` is refused unless
``gateway.allow_root: true`` (or ``SMTPGATE_ALLOW_ROOT=1`` in the environment,
for test rigs and containers whose root is already unprivileged).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

ALLOW_ROOT_VARIABLE = "SMTPGATE_ALLOW_ROOT"


class PrivilegeError(Exception):
    """The gateway must not (or cannot) run with the privileges it has."""


@dataclass(frozen=True)
class Drop:
    """Whom to become: a user id, its group id, and the names for messages."""

    user: str
    uid: int
    gid: int

    def own(self, root: Path) -> int:
        """Give ``root`` and everything under it to the user (symlinks themselves,
        never what they point to); returns how many entries changed owner."""
        if not root.exists():
            return 0
        changed = self._own(root)
        for directory, subdirs, files in os.walk(root):  # symlinked directories not entered
            for name in [*subdirs, *files]:
                changed += self._own(Path(directory) / name)
        return changed

    def _own(self, path: Path) -> int:
        status = path.lstat()
        if (status.st_uid, status.st_gid) == (self.uid, self.gid):
            return 0
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
        return 1

    def readable(self, path: Path) -> bool:
        """Whether the user will be able to read ``path`` by its mode bits (a 0600
        secret file: only when it is the user's own)."""
        try:
            status = path.stat()
        except OSError:
            return True  # missing: the configuration checks say so, not this
        if status.st_uid == self.uid:
            return bool(status.st_mode & stat.S_IRUSR)
        if status.st_gid == self.gid:
            return bool(status.st_mode & stat.S_IRGRP)
        return bool(status.st_mode & stat.S_IROTH)

    def unreadable(self, files: list[tuple[str, Path]]) -> list[str]:
        """Of ``(field, path)``, those the user could not read: after the drop they
        are read again (a reload, an applied revision, the API process)."""
        return [
            f"{field}: {path} is not readable by gateway.user {self.user}; "
            f"run: chown {self.user} {path}"
            for field, path in files
            if not self.readable(path)
        ]

    def now(self) -> None:
        """Become the user for good; PrivilegeError if root could be taken back."""
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - the kernel refuses it after setuid as root
            raise PrivilegeError("could take root back after dropping privileges")
        if os.getuid() != self.uid or os.geteuid() != self.uid or os.getegid() != self.gid:
            raise PrivilegeError("privileges were not dropped")  # pragma: no cover


def plan(
    user: str | None, group: str | None, *, allow_root: bool, uid: int | None = None
) -> Drop | None:
    """What ``serve`` must drop to (None: nothing to do); PrivilegeError when it
    runs as root without ``gateway.user`` and root is not allowed, or the user or
    group does not exist. ``uid``: the process's (for tests)."""
    running_as = os.geteuid() if uid is None else uid
    if running_as != 0:
        return None  # already unprivileged: gateway.user cannot change that
    if user is None:
        if allow_root or os.environ.get(ALLOW_ROOT_VARIABLE) == "1":
            return None
        raise PrivilegeError(
            "refusing to serve as root: set gateway.user (and gateway.group) to the "
            "unprivileged user to run as after binding the ports, or gateway.allow_root: true"
        )
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"gateway.user: no user {user!r} on this system") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"gateway.group: no group {group!r} on this system") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"gateway.user: {user!r} is root; name an unprivileged user")
    return Drop(user, entry.pw_uid, gid)


def unknown(user: str | None, group: str | None) -> list[str]:
    """``config check``'s warnings: a ``gateway.user`` or ``gateway.group`` this
    host does not have (the file may be checked elsewhere than where it runs)."""
    found = []
    try:
        if user is not None:
            pwd.getpwnam(user)
    except KeyError:
        found.append(f"gateway.user: no user {user!r} on this host")
    try:
        if group is not None:
            grp.getgrnam(group)
    except KeyError:
        found.append(f"gateway.group: no group {group!r} on this host")
    return found
