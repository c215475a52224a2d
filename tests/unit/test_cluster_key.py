"""One secret key per cluster: the fingerprint names a key without revealing
it, keys are installed atomically and privately, and ``check_cluster_key``
refuses a node whose key is missing or not the one the store recorded (on
SQLite store files, and once on a private PostgreSQL)."""

from __future__ import annotations

import base64
import hashlib
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from tests import postgres as private_postgres

from smtpgate.admin.keys import (
    FINGERPRINT_META,
    check_cluster_key,
    cluster_fingerprint,
    encryption_key,
)
from smtpgate.config.secret import (
    decrypt,
    encrypt,
    fingerprint,
    install_key,
    key_path,
    load_key,
    parse_key,
    read_key,
)
from smtpgate.config.store import ConfigStore
from smtpgate.errors import ConfigError

postgres = private_postgres.postgres  # the fixtures
postgres_url = private_postgres.postgres_url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ConfigStore]:
    opened = ConfigStore.open(tmp_path / "shared")
    yield opened
    opened.close()


def test_the_fingerprint_names_a_key_without_revealing_it() -> None:
    key = Fernet.generate_key()
    found = fingerprint(key)
    assert len(found) == 16
    int(found, 16)  # hex
    assert fingerprint(key + b"\n") == found  # as read from a file
    assert fingerprint(Fernet.generate_key()) != found
    raw = base64.urlsafe_b64decode(key)
    revealing = {
        key.decode(),
        raw.hex(),
        hashlib.sha256(raw).hexdigest(),
        hashlib.sha256(key).hexdigest(),
    }
    for text in revealing:
        for start in range(len(text) - 7):
            assert text[start : start + 8] not in found  # no 8 characters in common


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"not a key\n",
        b"enc:v1:gAAAAAB",
        b"A" * 44,  # 44 characters, but no "=" padding: not 32 bytes
        base64.b64encode(b"\xfb" * 32),  # standard, not urlsafe, base64
        base64.urlsafe_b64encode(b"k" * 31) + b"AAAA",
        Fernet.generate_key()[:-2],
    ],
)
def test_a_value_that_is_not_a_fernet_key_is_refused(text: bytes) -> None:
    assert parse_key(text) is None


def test_a_key_is_accepted_with_its_newline() -> None:
    key = Fernet.generate_key()
    assert parse_key(key + b"\n") == key
    assert parse_key(b"  " + key + b"\r\n") == key


def test_keys_are_private_and_never_replaced_unless_asked(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    first, second = Fernet.generate_key(), Fernet.generate_key()
    assert install_key(data_dir, first, replace=False)
    path = key_path(data_dir)
    assert (mode(path), mode(path.parent), mode(data_dir)) == (0o600, 0o700, 0o700)
    assert not install_key(data_dir, second, replace=False)
    assert read_key(data_dir) == first
    assert install_key(data_dir, second, replace=True)
    assert read_key(data_dir) == second
    assert mode(path) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]  # no leftovers


def test_load_key_creates_a_private_key_once(tmp_path: Path) -> None:
    key = load_key(tmp_path / "var", create=True)
    path = key_path(tmp_path / "var")
    assert (mode(path), mode(path.parent)) == (0o600, 0o700)
    token = encrypt(key, "s3cret")
    again = load_key(tmp_path / "var", create=True)
    assert decrypt(again, token, "x").get_secret_value() == "s3cret"


def test_a_damaged_key_file_is_named(tmp_path: Path) -> None:
    path = key_path(tmp_path)
    path.parent.mkdir()
    path.write_text("garbage\n")
    with pytest.raises(ConfigError, match="is not a key"):
        read_key(tmp_path)


# -- check_cluster_key ---------------------------------------------------------


def test_no_key_anywhere_is_fine_and_records_nothing(tmp_path: Path, store: ConfigStore) -> None:
    check_cluster_key(store, tmp_path / "node")
    assert cluster_fingerprint(store) is None
    assert not key_path(tmp_path / "node").exists()


def test_the_first_node_with_a_key_records_it(tmp_path: Path, store: ConfigStore) -> None:
    node = tmp_path / "node"
    key = Fernet.generate_key()
    install_key(node, key, replace=False)
    check_cluster_key(store, node)
    assert store.meta(FINGERPRINT_META) == fingerprint(key)
    check_cluster_key(store, node)  # idempotent
    assert store.metas(FINGERPRINT_META) == {FINGERPRINT_META: fingerprint(key)}


def test_a_node_without_a_key_is_told_to_import_the_clusters(
    tmp_path: Path, store: ConfigStore
) -> None:
    install_key(tmp_path / "first", Fernet.generate_key(), replace=False)
    check_cluster_key(store, tmp_path / "first")
    with pytest.raises(ConfigError) as caught:
        check_cluster_key(store, tmp_path / "second")
    message = str(caught.value)
    assert "this node has no secret key" in message
    assert str(key_path(tmp_path / "second")) in message
    assert "`smtpgate cluster key import`" in message
    assert not key_path(tmp_path / "second").exists()


def test_a_node_with_another_key_is_refused(tmp_path: Path, store: ConfigStore) -> None:
    cluster, other = Fernet.generate_key(), Fernet.generate_key()
    install_key(tmp_path / "first", cluster, replace=False)
    check_cluster_key(store, tmp_path / "first")
    install_key(tmp_path / "second", other, replace=False)
    with pytest.raises(ConfigError) as caught:
        check_cluster_key(store, tmp_path / "second")
    message = str(caught.value)
    assert (
        f"this node's secret key ({key_path(tmp_path / 'second')}, fingerprint "
        f"{fingerprint(other)}) is not the cluster's (fingerprint {fingerprint(cluster)})"
    ) in message
    assert "`smtpgate cluster key export`" in message
    assert store.meta(FINGERPRINT_META) == fingerprint(cluster)
    install_key(tmp_path / "second", cluster, replace=True)  # what import does
    check_cluster_key(store, tmp_path / "second")


def test_two_first_nodes_cannot_both_record_their_key(tmp_path: Path) -> None:
    nodes = [tmp_path / f"node{i}" for i in range(4)]
    for node in nodes:
        install_key(node, Fernet.generate_key(), replace=False)
    stores = [ConfigStore.open(tmp_path / "shared") for _ in nodes]
    start = threading.Barrier(len(nodes))
    outcome: dict[Path, str] = {}

    def check(store: ConfigStore, node: Path) -> None:
        start.wait()
        try:
            check_cluster_key(store, node)
            outcome[node] = "ok"
        except ConfigError:
            outcome[node] = "refused"

    pairs = zip(stores, nodes, strict=True)
    threads = [threading.Thread(target=check, args=pair) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcome.values()) == ["ok", "refused", "refused", "refused"]
    [winner] = [node for node, result in outcome.items() if result == "ok"]
    winning = read_key(winner)
    assert winning is not None
    assert stores[0].meta(FINGERPRINT_META) == fingerprint(winning)
    for opened in stores:
        opened.close()


def test_the_encryption_key_is_made_once_for_the_cluster(
    tmp_path: Path, store: ConfigStore
) -> None:
    first = encryption_key(store, tmp_path / "first")
    made = read_key(tmp_path / "first")
    assert made is not None
    assert cluster_fingerprint(store) == fingerprint(made)
    token = encrypt(first, "s3cret")
    with pytest.raises(ConfigError, match="this node has no secret key"):
        encryption_key(store, tmp_path / "second")  # never a key of its own
    assert not key_path(tmp_path / "second").exists()
    install_key(tmp_path / "second", made, replace=False)
    second = encryption_key(store, tmp_path / "second")
    assert decrypt(second, token, "x").get_secret_value() == "s3cret"


def test_the_cluster_key_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    stores = [ConfigStore.open(tmp_path / n, postgres_url) for n in ("a", "b")]
    try:
        key = encryption_key(stores[0], tmp_path / "a")
        assert stores[1].meta(FINGERPRINT_META) == fingerprint(read_key(tmp_path / "a") or b"")
        install_key(tmp_path / "b", Fernet.generate_key(), replace=False)
        with pytest.raises(ConfigError, match="is not the cluster's"):
            check_cluster_key(stores[1], tmp_path / "b")
        install_key(tmp_path / "b", read_key(tmp_path / "a") or b"", replace=True)
        check_cluster_key(stores[1], tmp_path / "b")
        assert encrypt(key, "x").startswith("enc:v1:")
    finally:
        for opened in stores:
            opened.close()
