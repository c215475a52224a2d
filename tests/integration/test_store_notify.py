"""Applied revisions are pushed to peers (PostgreSQL LISTEN/NOTIFY) and the poll
stays the safety net: a revision added through one store wakes a watcher on
another at once, only once committed; the watcher survives a server restart;
a store that is down, and SQLite, mean the plain poll. Against a real private
PostgreSQL (``tests/postgres.py``)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from smtpgate.config.store import ConfigStore
from smtpgate.config.watch import RevisionWatcher
from tests import postgres as private_postgres
from tests.postgres import PASSWORD, PASSWORD_ROLE, Postgres, free_port

postgres = private_postgres.postgres  # the fixtures
postgres_url = private_postgres.postgres_url

LONG = 30.0  # a wait that returns well before this was woken, not timed out


def password_store(tmp_path: Path, postgres: Postgres, postgres_url: str) -> ConfigStore:
    """The store as a peer opens it: the password role, its password from a file."""
    secret = tmp_path / "store.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    url = postgres.url(postgres_url.rsplit("/", 1)[1], user=PASSWORD_ROLE)
    return ConfigStore.open(tmp_path, url, secret)


def apply(store: ConfigStore, comment: str) -> int:
    with store.transaction() as connection:
        return store.add_revision(connection, {"comment": comment}, "alice", comment)


async def woken(watcher: RevisionWatcher) -> bool:
    """Whether ``wait`` returned early: woken, not timed out."""
    started = time.monotonic()
    notified = await watcher.wait(LONG)
    return notified and time.monotonic() - started < LONG / 2


@pytest.mark.both_loops  # `smtpgate serve` runs on uvloop
async def test_an_applied_revision_wakes_a_peer_once_committed(
    tmp_path: Path, postgres: Postgres, postgres_url: str
) -> None:
    reader = password_store(tmp_path, postgres, postgres_url)  # first: its role owns the tables
    writer = ConfigStore.open(tmp_path, postgres_url)
    try:
        async with RevisionWatcher.for_store(reader) as watcher:
            assert await woken(watcher)  # listening: read the current revision once
            assert (watcher.listening, watcher.connections, watcher.notifications) == (True, 1, 0)
            assert reader.applied_number() is None

            # inside the apply's transaction nothing is announced yet
            added, commit = threading.Event(), threading.Event()

            def slow_apply() -> int:
                with writer.transaction() as connection:
                    number = writer.add_revision(connection, {"a": 1}, "alice", "slow")
                    added.set()
                    commit.wait(LONG)
                return number

            applying = asyncio.create_task(asyncio.to_thread(slow_apply))
            assert await asyncio.to_thread(added.wait, LONG)
            assert not await watcher.wait(0.5)
            assert watcher.notifications == 0
            commit.set()
            assert await applying == 1
            assert await woken(watcher)
            assert (watcher.notifications, watcher.announced) == (1, 1)
            assert reader.applied_number() == 1

            assert await asyncio.to_thread(apply, writer, "second") == 2
            assert await woken(watcher)
            assert (watcher.notifications, watcher.announced) == (2, 2)
            assert reader.applied_number() == 2
        assert not watcher.listening  # closed
    finally:
        writer.close()
        reader.close()


@pytest.mark.both_loops  # `smtpgate serve` runs on uvloop
async def test_the_watcher_listens_again_after_the_server_restarts(
    tmp_path: Path, postgres: Postgres, postgres_url: str
) -> None:
    reader = password_store(tmp_path, postgres, postgres_url)  # first: its role owns the tables
    writer = ConfigStore.open(tmp_path, postgres_url)
    try:
        async with RevisionWatcher.for_store(reader) as watcher:
            assert await woken(watcher)
            assert watcher.connections == 1
            data = str(postgres.directory / "data")
            log = str(postgres.directory / "log")
            await asyncio.to_thread(
                postgres.run, str(postgres.bin / "pg_ctl"), "-D", data, "-l", log, "-m", "fast",
                "-w", "restart",
            )  # fmt: skip
            # once it listens again, wait returns so the caller reads what it missed
            assert await woken(watcher)
            assert watcher.connections == 2
            assert watcher.listening
            assert await asyncio.to_thread(apply, writer, "after the restart") == 1
            assert await woken(watcher)
            assert (watcher.notifications, watcher.announced) == (1, 1)
    finally:
        writer.close()
        reader.close()


async def test_a_store_that_is_down_means_the_plain_poll(tmp_path: Path) -> None:
    parameters = {
        "host": "127.0.0.1",
        "port": free_port(),  # nothing listens
        "user": PASSWORD_ROLE,
        "password": PASSWORD,
        "dbname": "config",
        "connect_timeout": "10",
    }
    async with RevisionWatcher(parameters, "postgresql://gate:***@127.0.0.1/config") as watcher:
        for _ in range(3):  # never raises, never returns early
            started = time.monotonic()
            assert not await watcher.wait(0.4)
            assert time.monotonic() - started >= 0.35
        assert not watcher.listening
        assert watcher.connections == 0
        assert "refused" in watcher.error or "failed" in watcher.error
        assert PASSWORD not in watcher.error


async def test_sqlite_has_no_channel_the_watcher_is_the_poll(tmp_path: Path) -> None:
    store = ConfigStore.open(tmp_path)
    try:
        assert store.listen_parameters() is None
        async with RevisionWatcher.for_store(store) as watcher:
            assert not await watcher.wait(0.01)
            assert apply(store, "first") == 1  # no NOTIFY on SQLite, and no error
            assert not await watcher.wait(0.01)
            assert watcher.notifications == 0
            assert watcher.connections == 0
    finally:
        store.close()
