"""Private files: everything under ``data_dir`` is 0700 (directories) or 0600
(files), whatever the umask the gateway was started with.

Message bodies, the queue database and its WAL, the configuration store and
the key that decrypts passwords all live there; another local user must not
read any of them. Three measures, each enough on its own for what it covers:

* the process umask is 077 from the start (``restrict_umask``), so files that
  libraries create for us (SQLite's ``-wal`` and ``-shm``) are private too;
* directories and database files are created private explicitly
  (``private_dir``, ``private_file``), whatever the umask;
* at start-up ``make_private`` walks ``data_dir`` and takes group and other
  permissions away from anything that has them, saying what it changed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def restrict_umask() -> None:
    """Make every file this process creates private by default."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """``path`` as a 0700 directory; missing parents are created 0700 too."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        directory.chmod(DIR_MODE)  # mkdir's mode is filtered by the umask
    path.chmod(DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """``path`` exists as a 0600 file (created empty if missing), in a private
    directory; used before SQLite opens a database, whose journals copy its mode."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def make_private(root: Path) -> list[str]:
    """Take group and other permissions from ``root`` and everything under it;
    returns what was changed, as ``"PATH: 0644 → 0600"``."""
    changed: list[str] = []
    if not root.exists():
        return changed
    for directory, subdirs, files in os.walk(root):
        base = Path(directory)
        _restrict(base, changed)
        for name in [*subdirs, *files]:
            if not (base / name).is_symlink():
                _restrict(base / name, changed)
    return changed


def _restrict(path: Path, changed: list[str]) -> None:
    mode = stat.S_IMODE(path.lstat().st_mode)
    if mode & 0o077:
        path.chmod(mode & 0o700)
        changed.append(f"{path}: {mode:04o} → {mode & 0o700:04o}")


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably, as a 0600 file:
    a crash leaves the old file or the new one, never half of either."""
    private_dir(path.parent)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
