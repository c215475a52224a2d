"""The POP3 fetch state in a real configuration store (SQLite): the lease that lets
one node of a cluster fetch a mailbox, and the ids taken, as two nodes see them."""

from __future__ import annotations

import time
from pathlib import Path

from smtpgate.config.store import ConfigStore
from smtpgate.fetch.state import FileState, StoreState, mailbox_key

KEY = mailbox_key("provider", "inbox@example.com")


def test_one_node_holds_the_lease_until_it_expires(tmp_path: Path) -> None:
    first, second = ConfigStore.open(tmp_path), ConfigStore.open(tmp_path)  # two nodes
    try:
        a, b = StoreState(first), StoreState(second)
        assert a.acquire(KEY, "gw1", 0.3)
        assert not b.acquire(KEY, "gw2", 0.3)
        assert a.acquire(KEY, "gw1", 0.3)  # renewed by its holder
        assert b.acquire(mailbox_key("provider", "other"), "gw2", 0.3)  # another mailbox
        time.sleep(0.35)
        assert b.acquire(KEY, "gw2", 60)  # expired: taken over
        assert not a.acquire(KEY, "gw1", 60)
    finally:
        first.close()
        second.close()


def test_the_node_that_takes_over_knows_the_ids_taken(tmp_path: Path) -> None:
    first, second = ConfigStore.open(tmp_path), ConfigStore.open(tmp_path)
    try:
        StoreState(first).mark(KEY, "uid-1", "queued")
        StoreState(first).mark(KEY, "uid-2", "refused")
        assert StoreState(second).seen(KEY) == {"uid-1": "queued", "uid-2": "refused"}
        StoreState(second).keep(KEY, {"uid-2"})  # uid-1 was deleted at QUIT
        assert StoreState(first).seen(KEY) == {"uid-2": "refused"}
    finally:
        first.close()
        second.close()


def test_without_a_store_the_ids_are_in_a_private_file(tmp_path: Path) -> None:
    state = FileState(tmp_path)
    state.mark(KEY, "uid-1", "queued")
    assert FileState(tmp_path).seen(KEY) == {"uid-1": "queued"}
    assert (tmp_path / "pop3-state.json").stat().st_mode & 0o777 == 0o600
    assert state.acquire(KEY, "gw1", 1)  # one node: always its own
