"""Connection counts for the inbound limits, exact across worker processes.

``InboundServer`` admits a connection only while ``limits.max_connections``
(in total), its last ``reserved_connections`` (only for known clients) and
``max_connections_per_ip`` hold. When N worker processes accept on one
listening socket, each counting alone would let N times as many in; the counts
have to be the gateway's, not the process's. Two implementations of one
protocol, ``ConnectionCounts``:

* ``LocalCounts``: a ``Counter`` and an int, for a single process;
* ``SharedCounts``: a table in a 0600 file that every worker maps
  (``mmap``), changed only under an exclusive ``flock`` of that file, so
  that checking the limits and counting the connection is one atomic step
  for the whole host.

``SharedCounts`` keeps one column of counts per worker: a worker that died
without removing its connections is forgotten with ``forget_worker(k)``
(by the supervisor when worker k dies, and by worker k when it starts); the
gateway's counts are the sums over the columns.

File layout (native byte order, all counters uint32)::

    header    magic "SGCOUNT1", version, workers W, capacity C, 16-byte hash key
    totals    W counters: connections of each worker
    hashes    C uint32: keyed BLAKE2b hash of the key in each slot
    counts    C x W counters: connections of each worker from the slot's IP
    keys      C x 17 bytes: family byte (0 = empty slot, 4, 6, 0xFF = not an IP)
              and the packed address, IPv4 padded to 16 bytes, or for text
              that is not an IP, a 16-byte hash of it

The table is open addressing with linear probing; C is a power of two at least
twice ``capacity_for`` (``max_connections``). There is an entry for an IP only
while it has connections, so there are never more entries than connections;
a removal shifts the entries after it back (backward-shift deletion), so
probing never meets a hole and no tombstones are needed.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import socket
import struct
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

from smtpgate.files import FILE_MODE, private_dir

__all__ = ["ConnectionCounts", "Limits", "LocalCounts", "SharedCounts", "refusal"]


class Limits(Protocol):
    """What the counts need of ``ServerLimits`` (which satisfies it)."""

    @property
    def max_connections(self) -> int: ...
    @property
    def max_connections_per_ip(self) -> int: ...
    @property
    def reserved_connections(self) -> int: ...


class ConnectionCounts(Protocol):
    """Open connections, in total and per client IP, checked against the limits."""

    def try_add(self, ip: str, *, known: bool, limits: Limits) -> str | None:
        """Count a connection from ``ip`` if the limits allow it (None), else
        say which limit refuses it: ``"total"``, ``"reserved"`` or ``"per_ip"``."""
        ...

    def remove(self, ip: str) -> None:
        """A connection from ``ip`` that ``try_add`` admitted has ended."""
        ...

    def total(self) -> int: ...

    def from_ip(self, ip: str) -> int: ...


def refusal(total: int, from_ip: int, *, known: bool, limits: Limits) -> str | None:
    """The rules of ``InboundServer._refusal``: which limit refuses one more
    connection, given the open ones in total and from its IP (None: none)."""
    if total >= limits.max_connections:
        return "total"
    if total >= limits.max_connections - limits.reserved_connections and not known:
        return "reserved"
    if from_ip >= limits.max_connections_per_ip:
        return "per_ip"
    return None


class LocalCounts:
    """The counts of one process."""

    def __init__(self) -> None:
        self._per_ip: Counter[str] = Counter()
        self._total = 0

    def try_add(self, ip: str, *, known: bool, limits: Limits) -> str | None:
        why = refusal(self._total, self._per_ip[ip], known=known, limits=limits)
        if why is None:
            self._per_ip[ip] += 1
            self._total += 1
        return why

    def remove(self, ip: str) -> None:
        count = self._per_ip.get(ip, 0)
        if count <= 0:
            return
        if count == 1:
            del self._per_ip[ip]
        else:
            self._per_ip[ip] = count - 1
        self._total -= 1

    def total(self) -> int:
        return self._total

    def from_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)


_MAGIC: Final = b"SGCOUNT1"
_VERSION: Final = 1
_HEADER: Final = struct.Struct("=8sIII16s4x")  # magic, version, workers, capacity, hash key
_KEY: Final = 17  # family byte + 16 bytes
_U32: Final = 4
_TEXT: Final = 0xFF  # family byte of a key hashed from text that is not an IP


def _key(ip: str) -> bytes:
    """The 17-byte table key of ``ip``: family byte and packed address."""
    try:
        return b"\x04" + socket.inet_pton(socket.AF_INET, ip) + bytes(12)
    except (OSError, ValueError):
        pass
    try:
        return b"\x06" + socket.inet_pton(socket.AF_INET6, ip)
    except (OSError, ValueError):
        pass
    text = ip.encode("utf-8", "surrogatepass")
    return bytes((_TEXT,)) + hashlib.blake2b(text, digest_size=16).digest()


def _capacity(capacity_for: int) -> int:
    """The smallest power of two that is at least ``2 * capacity_for`` (and 8)."""
    return max(8, 1 << max(0, 2 * capacity_for - 1).bit_length())


class SharedCounts:
    """The counts of all workers on this host, in a file every worker maps.

    ``create`` (the supervisor, before starting workers) makes the file;
    ``attach`` (each worker) maps it as worker ``worker``, the column its
    ``try_add`` and ``remove`` change. An instance is for one thread.
    """

    def __init__(self, path: Path, fd: int, worker: int | None) -> None:
        self.path = path
        self._fd = fd
        try:
            workers, capacity, hash_key = _read_header(path, fd, worker)
            self.workers: int = workers
            self.capacity: int = capacity
            self.worker = worker
            self._mask = capacity - 1
            self._hash_key: bytes = hash_key
            totals = _HEADER.size
            hashes = totals + workers * _U32
            counts = hashes + capacity * _U32
            keys = counts + capacity * workers * _U32
            size = keys + capacity * _KEY
            self._mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        view = memoryview(self._mm)
        self._totals = view[totals:hashes].cast("I")
        self._hashes = view[hashes:counts].cast("I")
        self._counts = view[counts:keys].cast("I")
        self._keys = view[keys:size]
        self._views = (view, self._totals, self._hashes, self._counts, self._keys)

    # -- set-up ------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, workers: int, capacity_for: int) -> SharedCounts:
        """A new, empty counts file at ``path`` (0600, in a 0700 directory) for
        ``workers`` workers and up to ``capacity_for`` connections (the
        ``max_connections``); the instance returned adds nothing (no worker).
        Replaces any old file atomically: workers still mapping it keep theirs."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        capacity = _capacity(capacity_for)
        size = _file_size(workers, capacity)
        private_dir(path.parent)
        temporary = path.with_name(path.name + ".tmp")
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, size)
            header = _HEADER.pack(_MAGIC, _VERSION, workers, capacity, secrets.token_bytes(16))
            os.pwrite(fd, header, 0)
            os.replace(temporary, path)
        except BaseException:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        return cls(path, fd, None)

    @classmethod
    def attach(cls, path: Path, worker: int) -> SharedCounts:
        """Map the counts file at ``path`` as worker ``worker`` (0-based)."""
        return cls(path, os.open(path, os.O_RDWR), worker)

    def close(self) -> None:
        if self._fd < 0:
            return
        for view in reversed(self._views):
            view.release()
        self._mm.close()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> SharedCounts:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- ConnectionCounts ----------------------------------------------------------

    def try_add(self, ip: str, *, known: bool, limits: Limits) -> str | None:
        worker = self._own_worker()
        key = _key(ip)
        h = self._hash(key)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            total = sum(self._totals)
            slot, found = self._find(key, h)
            from_ip = self._row_sum(slot) if found else 0
            why = refusal(total, from_ip, known=known, limits=limits)
            if why is not None:
                return why
            if not found:
                if total >= self.capacity - 1 or slot < 0:  # keep one slot empty
                    return "total"
                start = slot * _KEY
                self._keys[start : start + _KEY] = key
                self._hashes[slot] = h
            self._counts[slot * self.workers + worker] += 1
            self._totals[worker] += 1
            return None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def remove(self, ip: str) -> None:
        worker = self._own_worker()
        key = _key(ip)
        h = self._hash(key)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            slot, found = self._find(key, h)
            cell = slot * self.workers + worker
            if not found or self._counts[cell] == 0:
                return  # not counted here (or forgotten): nothing to remove
            self._counts[cell] -= 1
            if self._totals[worker] > 0:
                self._totals[worker] -= 1
            if self._row_sum(slot) == 0:
                self._delete(slot)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def total(self) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            return sum(self._totals)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def from_ip(self, ip: str) -> int:
        key = _key(ip)
        h = self._hash(key)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            slot, found = self._find(key, h)
            return self._row_sum(slot) if found else 0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- crashed workers ---------------------------------------------------------

    def forget_worker(self, worker: int) -> None:
        """Drop every connection counted for ``worker`` (which died, or is
        starting afresh). Rebuilds the table from its keys, so it also repairs
        what a worker killed in the middle of a change may have left."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} is not in 0..{self.workers - 1}")
        workers, keys, counts = self.workers, self._keys, self._counts
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            live: dict[bytes, list[int]] = {}
            for slot in range(self.capacity):
                start = slot * _KEY
                if keys[start] == 0:
                    continue
                row = counts[slot * workers : (slot + 1) * workers].tolist()
                row[worker] = 0
                live.setdefault(bytes(keys[start : start + _KEY]), row)
                keys[start] = 0
            counts[:] = _u32_row([0] * len(counts))
            totals = [0] * workers
            for key, row in live.items():
                if not any(row):
                    continue
                h = self._hash(key)
                slot, _ = self._find(key, h)
                keys[slot * _KEY : (slot + 1) * _KEY] = key
                self._hashes[slot] = h
                counts[slot * workers : (slot + 1) * workers] = _u32_row(row)
                totals = [t + n for t, n in zip(totals, row, strict=True)]
            self._totals[:] = _u32_row(totals)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- the hash table ------------------------------------------------------------

    def _own_worker(self) -> int:
        if self.worker is None:
            raise RuntimeError("this SharedCounts is not attached as a worker")
        return self.worker

    def _hash(self, key: bytes) -> int:
        digest = hashlib.blake2b(key, digest_size=4, key=self._hash_key).digest()
        return int.from_bytes(digest, "little")

    def _find(self, key: bytes, h: int) -> tuple[int, bool]:
        """The slot holding ``key`` (True), or the empty slot where it would go
        (False); (-1, False) if the table is full without it."""
        keys, hashes, mask = self._keys, self._hashes, self._mask
        slot = h & mask
        for _ in range(self.capacity):
            start = slot * _KEY
            if keys[start] == 0:
                return slot, False
            if hashes[slot] == h and keys[start : start + _KEY] == key:
                return slot, True
            slot = (slot + 1) & mask
        return -1, False

    def _row_sum(self, slot: int) -> int:
        workers = self.workers
        return sum(self._counts[slot * workers : (slot + 1) * workers])

    def _delete(self, slot: int) -> None:
        """Empty ``slot``, shifting back the entries after it in its cluster that
        may stand there (their home is not cyclically in ``(slot, their slot]``)."""
        keys, hashes, counts = self._keys, self._hashes, self._counts
        mask, workers = self._mask, self.workers
        hole = slot
        probe = slot
        for _ in range(self.capacity):
            probe = (probe + 1) & mask
            if keys[probe * _KEY] == 0:
                break
            home = hashes[probe] & mask
            if (probe - home) & mask >= (probe - hole) & mask:
                keys[hole * _KEY : (hole + 1) * _KEY] = keys[probe * _KEY : (probe + 1) * _KEY]
                hashes[hole] = hashes[probe]
                row = slice(hole * workers, (hole + 1) * workers)
                counts[row] = counts[probe * workers : (probe + 1) * workers]
                hole = probe
        keys[hole * _KEY] = 0
        for cell in range(hole * workers, (hole + 1) * workers):
            counts[cell] = 0


def _file_size(workers: int, capacity: int) -> int:
    return _HEADER.size + (workers + capacity + capacity * workers) * _U32 + capacity * _KEY


def _read_header(path: Path, fd: int, worker: int | None) -> tuple[int, int, bytes]:
    """Workers, capacity and hash key of the counts file open as ``fd``."""
    head = os.pread(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size:
        raise ValueError(f"{path}: not a connection-counts file")
    magic, version, workers, capacity, hash_key = _HEADER.unpack(head)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError(f"{path}: not a connection-counts file (version {_VERSION})")
    if worker is not None and not 0 <= worker < workers:
        raise ValueError(f"worker {worker} is not in 0..{workers - 1}")
    if os.fstat(fd).st_size != _file_size(workers, capacity):
        raise ValueError(f"{path}: size does not match its header")
    return workers, capacity, hash_key


def _u32_row(values: list[int]) -> memoryview:
    return memoryview(struct.pack(f"={len(values)}I", *values)).cast("I")
