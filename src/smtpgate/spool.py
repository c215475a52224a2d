"""Message bodies while they are received and handed on, and queue ids.

A :class:`SpooledBody` keeps a body in memory up to ``threshold`` octets and
spills it to a private file (mode 0600) beyond that, so a 50 MB message costs
one read buffer of memory, while the common small message never touches the
disk until it is made durable. A session that ends early discards its body;
files left by a crash are removed at start (:func:`clean_orphans`).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

SPILL_THRESHOLD = 128 * 1024
_COUNTER = itertools.count()
_PID = [os.getpid() & 0xFFF]  # getpid() is a system call; a forked child takes its own
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid() & 0xFFF))


def new_queue_id() -> str:
    """A short id, sortable by time, unique across processes on one host.

    Microseconds since the epoch, the process id and a per-process counter,
    in upper-case hex: cheap to make (it is made once per message).
    """
    now = time.time_ns() // 1000
    return f"{now:X}{_PID[0]:03X}{next(_COUNTER) & 0xFFF:03X}"


class Body(Protocol):
    """A message body that can be read back in pieces."""

    @property
    def size(self) -> int: ...

    def chunks(self, size: int = 65536) -> Iterator[bytes]: ...


class StoredBody:
    """A queued body: bytes from the queue database, or a file beside it."""

    def __init__(self, data: bytes | Path) -> None:
        self._data = data
        self._size = len(data) if isinstance(data, bytes) else data.stat().st_size

    @property
    def size(self) -> int:
        return self._size

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        if isinstance(self._data, bytes):
            for start in range(0, len(self._data), size):
                yield self._data[start : start + size]
            return
        with self._data.open("rb") as body:
            while chunk := body.read(size):
                yield chunk

    def head(self, limit: int) -> bytes:
        """The first ``limit`` octets (for returning a message in a report)."""
        out = bytearray()
        for chunk in self.chunks():
            out += chunk
            if len(out) >= limit:
                break
        return bytes(out[:limit])


class SpooledBody:
    """One message body, in memory or (when large) in a file under ``directory``."""

    def __init__(self, directory: Path, queue_id: str, threshold: int = SPILL_THRESHOLD) -> None:
        self.queue_id = queue_id
        self.directory = directory
        self.threshold = threshold
        self.size = 0
        self.path: Path | None = None  # set once the body has spilled to disk
        self._memory = bytearray()
        self._file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._memory += data
        if len(self._memory) > self.threshold:
            self._spill()

    def _spill(self) -> None:
        self.path = self.directory / f"{self.queue_id}.tmp"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=65536)
        self._file.write(bytes(self._memory))
        self._memory = bytearray()

    def finish(self) -> None:
        """No more writes: flush what is buffered."""
        if self._file is not None:
            self._file.close()

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        """Read the body back in pieces of at most ``size`` octets."""
        if self.path is None:
            view = memoryview(self._memory)
            for start in range(0, len(view), size):
                yield bytes(view[start : start + size])
            return
        with self.path.open("rb") as body:
            while chunk := body.read(size):
                yield chunk

    def head(self, limit: int = 1 << 20) -> bytes:
        """The header section (through the CRLF before the empty line), or ``b""``
        when none ends within ``limit`` octets."""
        seen = b""
        for chunk in self.chunks():
            seen += chunk
            end = seen.find(b"\r\n\r\n")
            if end >= 0:
                return seen[: end + 2]
            if len(seen) > limit:
                return b""
        return b""

    def replace_head(self, new: bytes, old_length: int) -> None:
        """Put ``new`` in place of the first ``old_length`` octets (a finished
        body; a file is rewritten by streaming, never read whole)."""
        if self.path is None:
            self._memory[0:old_length] = new
            self.size = len(self._memory)
            return
        source = self.path
        target = source.with_name(f"{self.queue_id}.head.tmp")  # an orphan is cleaned too
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb", buffering=65536) as out, source.open("rb") as body:
            out.write(new)
            body.seek(old_length)
            while chunk := body.read(65536):
                out.write(chunk)
        os.replace(target, source)
        self.size += len(new) - old_length

    def save_as(self, target: Path, *, fsync: bool) -> None:
        """Make the body a file at ``target`` (durable when ``fsync``)."""
        if self.path is not None:
            if fsync:
                fsync_path(self.path)
            os.replace(self.path, target)
            self.path = None
            return
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self._memory)
            if fsync:
                out.flush()
                os.fsync(out.fileno())

    def discard(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        self._memory = bytearray()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_orphans(directory: Path) -> int:
    """Remove spool files left by a crash; returns how many."""
    removed = 0
    for path in directory.glob("*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
