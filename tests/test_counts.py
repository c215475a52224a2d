"""Connection counts: the limits of ``InboundServer`` kept exactly, in one
process (``LocalCounts``) and across worker processes (``SharedCounts``)."""

from __future__ import annotations

import multiprocessing
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.inbound.counts import ConnectionCounts, LocalCounts, SharedCounts, refusal


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_connections_per_ip: int
    reserved_connections: int = 0


@pytest.fixture(params=["local", "shared"])
def counts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ConnectionCounts]:
    if request.param == "local":
        yield LocalCounts()
        return
    SharedCounts.create(tmp_path / "counts", workers=3, capacity_for=10).close()
    with SharedCounts.attach(tmp_path / "counts", worker=1) as shared:
        yield shared


def test_total_limit(counts: ConnectionCounts) -> None:
    limits = Limits(max_connections=3, max_connections_per_ip=10)
    for ip in ["192.0.2.1", "192.0.2.2", "2001:db8::1"]:
        assert counts.try_add(ip, known=True, limits=limits) is None
    assert counts.try_add("192.0.2.4", known=True, limits=limits) == "total"
    assert counts.try_add("192.0.2.1", known=False, limits=limits) == "total"
    assert counts.total() == 3
    counts.remove("192.0.2.2")
    assert counts.try_add("192.0.2.4", known=False, limits=limits) is None
    assert counts.total() == 3


def test_reserved_share_is_for_known_clients(counts: ConnectionCounts) -> None:
    limits = Limits(max_connections=4, max_connections_per_ip=10, reserved_connections=2)
    assert counts.try_add("192.0.2.1", known=False, limits=limits) is None
    assert counts.try_add("192.0.2.2", known=False, limits=limits) is None
    assert counts.try_add("192.0.2.3", known=False, limits=limits) == "reserved"
    assert counts.try_add("192.0.2.9", known=True, limits=limits) is None
    assert counts.try_add("192.0.2.3", known=False, limits=limits) == "reserved"
    assert counts.try_add("192.0.2.9", known=True, limits=limits) is None
    assert counts.try_add("192.0.2.9", known=True, limits=limits) == "total"
    counts.remove("192.0.2.9")
    counts.remove("192.0.2.9")
    counts.remove("192.0.2.1")
    assert counts.try_add("192.0.2.3", known=False, limits=limits) is None


def test_total_is_checked_before_reserved_and_per_ip(counts: ConnectionCounts) -> None:
    limits = Limits(max_connections=2, max_connections_per_ip=1, reserved_connections=1)
    assert counts.try_add("192.0.2.1", known=True, limits=limits) is None
    assert counts.try_add("192.0.2.1", known=False, limits=limits) == "reserved"
    assert counts.try_add("192.0.2.1", known=True, limits=limits) == "per_ip"
    assert counts.try_add("192.0.2.2", known=True, limits=limits) is None
    assert counts.try_add("192.0.2.1", known=True, limits=limits) == "total"


@pytest.mark.parametrize(
    ("ip", "other"),
    [
        ("192.0.2.1", "192.0.2.2"),
        ("2001:db8::1", "2001:db8::2"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # the mapped form is a different key
        ("unknown", "unknown2"),
        ("", "\udcff not utf-8"),
    ],
)
def test_per_ip_limit(counts: ConnectionCounts, ip: str, other: str) -> None:
    limits = Limits(max_connections=10, max_connections_per_ip=2)
    assert counts.try_add(ip, known=True, limits=limits) is None
    assert counts.try_add(ip, known=True, limits=limits) is None
    assert counts.try_add(ip, known=True, limits=limits) == "per_ip"
    assert counts.try_add(other, known=False, limits=limits) is None
    assert (counts.from_ip(ip), counts.from_ip(other), counts.total()) == (2, 1, 3)
    counts.remove(ip)
    assert counts.from_ip(ip) == 1
    assert counts.try_add(ip, known=False, limits=limits) is None
    for _ in range(3):
        counts.remove(ip)  # one more than were counted: ignored
    counts.remove(other)
    assert (counts.from_ip(ip), counts.from_ip(other), counts.total()) == (0, 0, 0)


def test_removing_what_was_never_counted_changes_nothing(counts: ConnectionCounts) -> None:
    limits = Limits(max_connections=10, max_connections_per_ip=2)
    counts.remove("192.0.2.1")
    assert counts.try_add("192.0.2.2", known=False, limits=limits) is None
    counts.remove("192.0.2.1")
    assert (counts.total(), counts.from_ip("192.0.2.1"), counts.from_ip("192.0.2.2")) == (1, 0, 1)


# -- many IPs, random order, against a reference ------------------------------------

IPS = [f"192.0.2.{n}" for n in range(12)] + [f"2001:db8::{n:x}" for n in range(12)] + ["x"]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "forget"]), st.integers(0, 1), st.sampled_from(IPS)
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, per_ip=st.integers(1, 4), known=st.booleans())
def test_random_adds_and_removes_match_a_reference(
    ops: list[tuple[str, int, str]], per_ip: int, known: bool
) -> None:
    """A small table (16 slots for 25 IPs, at most 7 at a time) so that probing
    clusters wrap around and removals shift entries back."""
    limits = Limits(max_connections=8, max_connections_per_ip=per_ip, reserved_connections=2)
    reference = [Counter[str](), Counter[str]()]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "counts"
        with (
            SharedCounts.create(path, workers=2, capacity_for=limits.max_connections) as boss,
            SharedCounts.attach(path, 0) as zero,
            SharedCounts.attach(path, 1) as one,
        ):
            assert boss.capacity == 16
            workers = [zero, one]
            for op, worker, ip in ops:
                if op == "add":
                    total = sum(reference[0].values()) + sum(reference[1].values())
                    from_ip = reference[0][ip] + reference[1][ip]
                    expected = refusal(total, from_ip, known=known, limits=limits)
                    assert workers[worker].try_add(ip, known=known, limits=limits) == expected
                    if expected is None:
                        reference[worker][ip] += 1
                elif op == "remove":
                    workers[worker].remove(ip)
                    if reference[worker][ip] > 0:
                        reference[worker][ip] -= 1
                else:
                    boss.forget_worker(worker)
                    reference[worker].clear()
                everyone = reference[0] + reference[1]
                assert boss.total() == everyone.total()
                for each in IPS:
                    assert boss.from_ip(each) == everyone[each]
            for counts, mine in zip(workers, reference, strict=True):
                for ip, n in mine.items():
                    for _ in range(n):
                        counts.remove(ip)
            assert boss.total() == 0
            assert all(boss.from_ip(ip) == 0 for ip in IPS)
            assert _occupied(boss) == 0


def _occupied(shared: SharedCounts) -> int:
    """Slots in use (a table emptied by removals must have none left)."""
    keys = shared._keys
    return sum(1 for slot in range(shared.capacity) if keys[slot * 17] != 0)


# -- across processes ------------------------------------------------------------------


def _race(path: Path, worker: int, start: Any, ip: str, tries: int, results: Any) -> None:
    counts = SharedCounts.attach(path, worker)
    limits = Limits(max_connections=1000, max_connections_per_ip=7)
    start.wait()
    admitted = sum(counts.try_add(ip, known=False, limits=limits) is None for _ in range(tries))
    results.put((worker, admitted))


def _hold(path: Path, worker: int, ip: str, n: int) -> None:
    counts = SharedCounts.attach(path, worker)
    limits = Limits(max_connections=1000, max_connections_per_ip=1000)
    for _ in range(n):
        assert counts.try_add(ip, known=False, limits=limits) is None
    os._exit(0)  # dies without removing its connections


def test_workers_racing_for_one_ip_admit_exactly_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(4)
    results = context.Queue()
    with SharedCounts.create(path, workers=4, capacity_for=1000) as boss:
        processes = [
            context.Process(target=_race, args=(path, k, start, "2001:db8::25", 200, results))
            for k in range(4)
        ]
        for process in processes:
            process.start()
        admitted = dict(results.get(timeout=10) for _ in processes)
        for process in processes:
            process.join(10)
            assert process.exitcode == 0
        assert sum(admitted.values()) == 7
        assert boss.total() == 7
        assert boss.from_ip("2001:db8::25") == 7
        for k in range(4):
            boss.forget_worker(k)
            assert boss.total() == 7 - sum(admitted[j] for j in range(k + 1))
        assert boss.from_ip("2001:db8::25") == 0


def test_forgetting_a_dead_worker_frees_its_connections(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    context = multiprocessing.get_context("fork")
    limits = Limits(max_connections=5, max_connections_per_ip=5)
    with (
        SharedCounts.create(path, workers=2, capacity_for=limits.max_connections) as boss,
        SharedCounts.attach(path, 0) as alive,
    ):
        assert alive.try_add("192.0.2.1", known=False, limits=limits) is None
        dead = context.Process(target=_hold, args=(path, 1, "192.0.2.1", 3))
        dead.start()
        dead.join(10)
        assert dead.exitcode == 0
        assert boss.total() == 4
        assert alive.try_add("192.0.2.1", known=False, limits=limits) is None
        assert alive.try_add("192.0.2.1", known=False, limits=limits) == "total"
        boss.forget_worker(1)
        assert (boss.total(), boss.from_ip("192.0.2.1")) == (2, 2)
        assert alive.try_add("192.0.2.2", known=False, limits=limits) is None
        alive.remove("192.0.2.1")
        alive.remove("192.0.2.1")
        alive.remove("192.0.2.2")
        assert boss.total() == 0
        assert _occupied(boss) == 0


def test_file_is_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "run" / "counts"
    SharedCounts.create(path, workers=2, capacity_for=100).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(os.listdir(path.parent)) == ["counts"]
    with pytest.raises(ValueError, match="worker 2"):
        SharedCounts.attach(path, 2)
    with SharedCounts.attach(path, 0) as worker:
        assert worker.capacity == 256
    (tmp_path / "other").write_bytes(b"not a counts file at all" * 4)
    with pytest.raises(ValueError, match="not a connection-counts file"):
        SharedCounts.attach(tmp_path / "other", 0)
    with SharedCounts.create(path, 2, 100) as boss, pytest.raises(RuntimeError):
        boss.try_add("192.0.2.1", known=False, limits=Limits(1, 1))
