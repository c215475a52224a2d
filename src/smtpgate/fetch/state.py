"""What a fetch connector remembers: the unique ids taken per mailbox, and who fetches.

Per mailbox (connector name and user name):

* ``seen``: unique id (UIDL) → ``queued`` (committed to the queue: on the
  next session it is only deleted, never taken again) or ``refused`` (the
  gateway's policy or content checks refused it: left in the mailbox, never
  fetched again). Written durably *after* the queue committed the message and
  *before* DELE, so a crash between fetch and delete neither loses the
  message (it is still in the mailbox) nor delivers it twice (its id is
  known). After a successful QUIT the ids no longer in the mailbox are
  forgotten, so the record stays as small as the mailbox.
* ``lease``: the node that fetches the mailbox, until when. A node takes the
  lease when it is free, expired or its own; the others skip the mailbox.

With a configuration store (SQLite or PostgreSQL, shared by a cluster) both
live in its ``meta`` table, in write transactions that hold the store's write
lock (PostgreSQL: its advisory lock), so the lease is exclusive across nodes
and a node that takes over knows which ids were taken. Without a store (a
single node started from a file) they live in ``data_dir/pop3-state.json``
(0600, replaced atomically and durably).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Literal, Protocol

from smtpgate.config.store import ConfigStore
from smtpgate.files import write_private

Mark = Literal["queued", "refused"]
MAX_SEEN = 20_000  # ids kept per mailbox (a mailbox larger than this is fetched in parts)
FILE = "pop3-state.json"


def mailbox_key(connector: str, username: str) -> str:
    return json.dumps([connector, username], ensure_ascii=True)


class FetchState(Protocol):
    def acquire(self, key: str, node: str, ttl: float) -> bool: ...
    def seen(self, key: str) -> dict[str, Mark]: ...
    def mark(self, key: str, uid: str, mark: Mark) -> None: ...
    def keep(self, key: str, uids: set[str]) -> None: ...


def _clean(raw: object) -> dict[str, Mark]:
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if v in ("queued", "refused")}


class StoreState:
    """In the configuration store's ``meta`` table (shared by the cluster)."""

    def __init__(self, store: ConfigStore) -> None:
        self.store = store

    def acquire(self, key: str, node: str, ttl: float) -> bool:
        name = f"pop3:lease:{key}"
        with self.store.transaction() as connection:
            held = self.store.meta(name)
            now = time.time()
            if held is not None:
                try:
                    owner, until = json.loads(held)
                except (ValueError, TypeError):
                    owner, until = "", 0.0
                if owner != node and float(until) > now:
                    return False
            self.store.set_meta(connection, name, json.dumps([node, now + ttl]))
        return True

    def seen(self, key: str) -> dict[str, Mark]:
        raw = self.store.meta(f"pop3:seen:{key}")
        try:
            return _clean(json.loads(raw)) if raw else {}
        except ValueError:
            return {}

    def _write(self, key: str, seen: dict[str, Mark]) -> None:
        with self.store.transaction() as connection:
            self.store.set_meta(connection, f"pop3:seen:{key}", json.dumps(seen))

    def mark(self, key: str, uid: str, mark: Mark) -> None:
        seen = self.seen(key)
        seen[uid] = mark
        self._write(key, dict(list(seen.items())[-MAX_SEEN:]))

    def keep(self, key: str, uids: set[str]) -> None:
        seen = self.seen(key)
        self._write(key, {u: m for u, m in seen.items() if u in uids})


class FileState:
    """In ``data_dir/pop3-state.json``: one node, no store; the lease is always ours."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, Mark]]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): _clean(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def _save(self, data: dict[str, dict[str, Mark]]) -> None:
        write_private(self.path, json.dumps(data).encode())

    def acquire(self, key: str, node: str, ttl: float) -> bool:
        return True

    def seen(self, key: str) -> dict[str, Mark]:
        with self._lock:
            return self._load().get(key, {})

    def mark(self, key: str, uid: str, mark: Mark) -> None:
        with self._lock:
            data = self._load()
            seen = data.setdefault(key, {})
            seen[uid] = mark
            data[key] = dict(list(seen.items())[-MAX_SEEN:])
            self._save(data)

    def keep(self, key: str, uids: set[str]) -> None:
        with self._lock:
            data = self._load()
            data[key] = {u: m for u, m in data.get(key, {}).items() if u in uids}
            self._save(data)
