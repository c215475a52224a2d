"""Spool files: where a message body streams while it is being received.

A body is written as it arrives, so memory stays at one read buffer whatever
the message size. A spool file is private to its session until the message
is handed on; a session that ends early removes it. Files are created with
mode 0600: bodies are confidential.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"


def new_queue_id() -> str:
    """A short, sortable, unique id: microsecond time then 5 random characters."""
    now = time.time_ns() // 1000
    digits = []
    while now:
        now, rest = divmod(now, len(_ALPHABET))
        digits.append(_ALPHABET[rest])
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(5))
    return "".join(reversed(digits)) + suffix


class SpoolFile:
    """One body being received into ``directory``."""

    def __init__(self, directory: Path, queue_id: str) -> None:
        self.queue_id = queue_id
        self.path = directory / f"{queue_id}.tmp"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=65536)
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def close(self) -> Path:
        """Flush and close; the body is complete at ``path``."""
        self._file.close()
        return self.path

    def discard(self) -> None:
        """Forget the body (the message was refused or the session ended)."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


def clean_orphans(directory: Path) -> int:
    """Remove spool files left by a crash; returns how many."""
    removed = 0
    for path in directory.glob("*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
