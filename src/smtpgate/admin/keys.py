"""One secret key for the whole cluster.

Peer gateways share one configuration store, and the secrets in it (credential
and smarthost passwords, certificate PINs) are encrypted with the key in each
node's ``data_dir/keys/secret.key``: a node with another key could not read
them, and a secret it encrypted could not be read by its peers. The store
therefore records the cluster key's fingerprint (meta ``secret_key_fingerprint``,
never the key) and a node checks its own key against it
(``check_cluster_key``) when it starts and before it encrypts
(``encryption_key``). The first node with a key records it, inside a store
transaction, so two first nodes cannot both record different ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from smtpgate.config.secret import fingerprint, key_path, load_key, read_key
from smtpgate.config.store import settings
from smtpgate.errors import ConfigError, FieldProblem

if TYPE_CHECKING:
    from cryptography.fernet import Fernet
    from sqlalchemy import Connection

    from smtpgate.config.store import ConfigStore

FINGERPRINT_META = "secret_key_fingerprint"
WHERE = "gateway.data_dir"


def node_fingerprint(data_dir: Path) -> str | None:
    """This node's key's fingerprint; ``None`` when it has no key yet."""
    key = read_key(data_dir)
    return fingerprint(key) if key is not None else None


def cluster_fingerprint(store: ConfigStore) -> str | None:
    """The fingerprint the store recorded; ``None`` before any node had a key."""
    return store.meta(FINGERPRINT_META)


def check_cluster_key(store: ConfigStore, data_dir: Path) -> None:
    """Refuse (ConfigError) a node whose key is missing or not the cluster's;
    record this node's key as the cluster's when the store has none yet.

    Cheap and idempotent: a file read and a one-row query once recorded."""
    mine = node_fingerprint(data_dir)
    recorded = cluster_fingerprint(store)
    if recorded is None and mine is not None:
        with store.transaction() as connection:  # the write lock: one first node
            recorded = _recorded(connection)
            if recorded is None:
                store.set_meta(connection, FINGERPRINT_META, mine)
                return
    if recorded is None:
        return  # no node has a key yet: there are no secrets
    if mine is None:
        raise ConfigError([FieldProblem(WHERE, _missing(data_dir, recorded))])
    if mine != recorded:
        raise ConfigError([FieldProblem(WHERE, _different(data_dir, mine, recorded))])


def encryption_key(store: ConfigStore, data_dir: Path) -> Fernet:
    """The key to encrypt a secret with: this node's, checked against the
    cluster's; made (and recorded as the cluster's) when no node has one yet.
    A node without a key in a cluster that has one is refused rather than
    given a key of its own."""
    check_cluster_key(store, data_dir)
    if read_key(data_dir) is not None:
        return load_key(data_dir, create=False)
    with store.transaction() as connection:  # no other node makes one meanwhile
        recorded = _recorded(connection)
        if recorded is not None:
            raise ConfigError([FieldProblem(WHERE, _missing(data_dir, recorded))])
        key = load_key(data_dir, create=True)
        created = read_key(data_dir)
        assert created is not None
        store.set_meta(connection, FINGERPRINT_META, fingerprint(created))
    return key


def _recorded(connection: Connection) -> str | None:
    row = connection.execute(
        select(settings.c.value).where(settings.c.key == FINGERPRINT_META)
    ).first()
    return str(row[0]) if row else None


def _missing(data_dir: Path, recorded: str) -> str:
    return (
        f"this node has no secret key ({key_path(data_dir)}) but the cluster has one "
        f"(fingerprint {recorded}): copy it from a running peer with "
        "`smtpgate cluster key export` there and `smtpgate cluster key import` here"
    )


def _different(data_dir: Path, mine: str, recorded: str) -> str:
    return (
        f"this node's secret key ({key_path(data_dir)}, fingerprint {mine}) is not the "
        f"cluster's (fingerprint {recorded}): copy the key of a running peer with "
        "`smtpgate cluster key export` there and `smtpgate cluster key import` here"
    )
