"""The configuration lifecycle over a real store, SQLite and PostgreSQL: draft, diff, validate,
apply, history, rollback, import, the audit log, tokens, and how the file that
``smtpgate serve`` is given relates to the store."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpgate.admin import edit
from smtpgate.admin.services import (
    ConfigService,
    authenticate,
    create_token,
    revoke_token,
)
from smtpgate.config.document import normalise
from smtpgate.config.load import parse_config
from smtpgate.config.store import ConfigStore, store_path, tokens
from smtpgate.errors import ConfigError, Conflict, NotFound
from tests.postgres import postgres, postgres_url  # noqa: F401 - fixtures


def document(data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "gateway": {"hostname": "gw.test", "data_dir": str(data_dir)},
        "hosted_domains": ["example.com"],
        "listeners": [{"name": "mx", "address": "127.0.0.1:2525", "security": "none"}],
        "connection_profiles": [{"name": "partner", "client_hosts": ["10.0.0.0/8"]}],
        **extra,
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """``""`` (SQLite in the data directory) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ""
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def service(tmp_path: Path, store_url: str) -> Iterator[ConfigService]:
    data_dir = tmp_path / "var"
    service = ConfigService(ConfigStore.open(data_dir, store_url), data_dir)
    service.adopt_file(parse_config(document(data_dir)), "file:gateway.yaml")
    yield service
    service.store.close()


def relay_of(service: ConfigService, which: str = "draft") -> str:
    relay: str = edit.get_item(service.view(which), "connection_profiles", "partner")["relay"]
    return relay


def set_relay(service: ConfigService, relay: str, version: int | None = None) -> None:
    def change(doc: dict[str, Any]) -> dict[str, Any]:
        item = edit.apply_edits(edit.get_item(doc, "connection_profiles", "partner"), [relay])
        return edit.replace_item(doc, "connection_profiles", "partner", item)

    service.edit(change, "test", "relay", version)


def test_the_store_is_private(tmp_path: Path) -> None:
    ConfigStore.open(tmp_path, "").close()
    mode = stat.S_IMODE(store_path(tmp_path).stat().st_mode)
    assert mode == 0o600


def test_edits_change_only_the_draft_until_apply(service: ConfigService) -> None:
    set_relay(service, "relay=restricted-external")
    assert relay_of(service, "applied") == "none"
    assert relay_of(service) == "restricted-external"
    assert [c.text() for c in service.diff()] == [
        "connection profile partner: relay none → restricted-external"
    ]
    result = service.apply("alice", "partner may relay out")
    assert result.revision == 2
    assert result.restart_required == []
    assert relay_of(service, "applied") == "restricted-external"
    assert service.draft() is None
    assert service.diff() == []
    history = service.history()
    assert [(r.number, r.applied_by, r.comment) for r in history] == [
        (2, "alice", "partner may relay out"),
        (1, "file:gateway.yaml", "from the configuration file"),
    ]
    actions = [(e.actor, e.action) for e in service.store.audit_log()]
    assert actions[:2] == [("alice", "apply"), ("test", "draft.edit")]


def test_an_invalid_edit_is_refused_with_the_field_path(service: ConfigService) -> None:
    with pytest.raises(ConfigError) as caught:
        set_relay(service, "relay=sometimes")
    assert caught.value.problems[0].path == "connection_profiles[0].relay"
    with pytest.raises(ConfigError) as caught:
        set_relay(service, "client_hosts+=10.0.0.1/8")
    assert "client_hosts[1]" in caught.value.problems[0].path
    assert service.draft() is None  # nothing was staged


def test_cross_field_checks_run_on_every_edit(service: ConfigService) -> None:
    def duplicate(doc: dict[str, Any]) -> dict[str, Any]:
        return edit.add_item(
            doc, "connection_profiles", {"name": "twin", "client_hosts": ["10.0.0.0/8"]}
        )

    with pytest.raises(ConfigError, match=r"10\.0\.0\.0/8"):
        service.edit(duplicate, "test", "twin")


def test_the_data_directory_cannot_move_through_the_store(service: ConfigService) -> None:
    def move(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "gateway": {**doc["gateway"], "data_dir": "/elsewhere"}}

    with pytest.raises(ConfigError) as caught:
        service.edit(move, "test", "move")
    assert caught.value.problems[0].path == "gateway.data_dir"


@pytest.mark.parametrize(
    ("name", "value"),
    [("store", "sqlite:///elsewhere.db"), ("store_password_file", "db.password")],
)
def test_the_store_cannot_move_through_the_store(
    service: ConfigService, name: str, value: str
) -> None:
    if name == "store_password_file":
        service.data_dir.mkdir(parents=True, exist_ok=True)  # PostgreSQL: nothing there yet
        secret = service.data_dir / value
        secret.write_text("pw")
        secret.chmod(0o600)
        value = str(secret)

    def move(doc: dict[str, Any]) -> dict[str, Any]:
        doc["gateway"][name] = value
        return doc

    with pytest.raises(
        ConfigError, match=rf"gateway\.{name}: node-local: set it in the configuration file"
    ):
        service.edit(move, "alice", "move")


def test_a_stale_editor_is_refused(service: ConfigService) -> None:
    set_relay(service, "relay=full")
    version = service.working()[1]
    set_relay(service, "notes=someone else", version)  # in time
    with pytest.raises(Conflict, match="changed since you read it"):
        set_relay(service, "relay=blocked", version)  # read before that change
    assert relay_of(service) == "full"


def test_import_and_rollback_never_drop_a_draft_silently(service: ConfigService) -> None:
    set_relay(service, "relay=full")
    service.apply("alice")
    set_relay(service, "relay=blocked")
    with pytest.raises(Conflict, match="draft is staged"):
        service.rollback(1, "bob")
    with pytest.raises(Conflict, match="draft is staged"):
        service.import_document(document(service.data_dir), "bob")
    assert relay_of(service) == "blocked"
    service.rollback(1, "bob", force=True)
    assert relay_of(service) == "none"
    with pytest.raises(NotFound):
        service.rollback(9, "bob", force=True)
    service.apply("bob", "roll back")
    assert relay_of(service, "applied") == "none"
    assert service.store.applied_number() == 3


def test_discard(service: ConfigService) -> None:
    with pytest.raises(NotFound):
        service.discard("alice")
    set_relay(service, "relay=full")
    service.discard("alice")
    assert service.draft() is None
    with pytest.raises(Conflict, match="no draft"):
        service.apply("alice")


def test_validate_opens_certificates_and_secrets(service: ConfigService) -> None:
    missing = {"name": "gw", "cert": str(service.data_dir / "missing.pem")}

    def add(doc: dict[str, Any]) -> dict[str, Any]:
        return edit.add_item(doc, "certificates", missing)

    service.edit(add, "test", "certificate")
    problems = service.validate()
    assert problems
    assert problems[0].path.startswith("certificates[0]")
    with pytest.raises(ConfigError):
        service.apply("alice")
    assert service.store.applied_number() == 1


def test_round_trip_export_import_diff_is_empty(service: ConfigService) -> None:

    set_relay(service, "relay=restricted-internal")
    service.apply("alice")
    exported = service.export("applied")
    service.import_document(yaml.safe_load(exported), "alice")
    assert service.diff() == []


def test_the_file_and_the_store(tmp_path: Path, store_url: str) -> None:
    data_dir = tmp_path / "var"
    service = ConfigService(ConfigStore.open(data_dir, store_url), data_dir)
    file_config = parse_config(document(data_dir))
    revision, what = service.adopt_file(file_config, "file:g.yaml")
    assert (revision.number, what) == (
        1,
        "the configuration file is new or changed: running revision 1",
    )
    # changes applied through the store survive a restart with the same file
    set_relay(service, "relay=full")
    service.apply("alice")
    revision, what = service.adopt_file(file_config, "file:g.yaml")
    assert revision.number == 2
    assert "from the store" in what
    assert relay_of(service, "applied") == "full"
    # a changed file wins, as a new revision; a staged draft stays staged
    set_relay(service, "relay=blocked")
    changed = parse_config(document(data_dir, hosted_domains=["example.net"]))
    revision, what = service.adopt_file(changed, "file:g.yaml")
    assert revision.number == 3
    assert revision.document == normalise(document(data_dir, hosted_domains=["example.net"]))
    assert "draft based on revision 2 is still staged" in what
    assert relay_of(service) == "blocked"
    # applying it would undo revision 3 (the file's change): only when forced
    with pytest.raises(Conflict, match="staged on revision 2"):
        service.apply("alice")
    assert service.diff()[0].text() == "hosted domains: removed example.net"
    assert service.apply("alice", force=True).revision == 4


def test_a_replaced_draft_starts_from_the_applied_revision(service: ConfigService) -> None:
    set_relay(service, "relay=full")  # staged on revision 1
    newer = parse_config(document(service.data_dir, hosted_domains=["example.net"]))
    service.adopt_file(newer, "file:g.yaml")  # revision 2 arrives meanwhile
    service.import_document(document(service.data_dir), "bob", force=True)
    assert service.draft().base_revision == 2  # type: ignore[union-attr]
    assert service.apply("bob").revision == 3  # no force needed: nothing is undone unseen


def test_tokens_are_kept_hashed(service: ConfigService) -> None:
    token = create_token(service.store, "ops", "cli:root")
    assert authenticate(service.store, token) == "ops"
    assert authenticate(service.store, token + "x") is None
    assert authenticate(service.store, "") is None
    with service.store.engine.connect() as connection:
        rows = [tuple(map(str, row)) for row in connection.execute(tokens.select())]
    assert rows
    assert not any(token in value for row in rows for value in row)
    if store_path(service.data_dir).exists():  # SQLite: not in the file either
        assert token.encode() not in store_path(service.data_dir).read_bytes()
    with pytest.raises(Conflict):
        create_token(service.store, "ops", "cli:root")
    revoke_token(service.store, "ops", "cli:root")
    assert authenticate(service.store, token) is None
    with pytest.raises(NotFound):
        revoke_token(service.store, "ops", "cli:root")


def peer(tmp_path: Path, store_url: str, node: str, **extra: Any) -> tuple[ConfigService, Any]:
    """A second node on the same store: its own data directory and file."""
    data_dir = tmp_path / node
    url = store_url or f"sqlite:///{tmp_path / 'var' / 'config.db'}"
    doc = document(data_dir, **extra)
    doc["gateway"] |= {"node": node, "hostname": f"{node}.test"}
    doc["listeners"][0]["address"] = "127.0.0.1:2600"
    return ConfigService(ConfigStore.open(data_dir, url), data_dir), parse_config(doc)


def test_the_store_holds_only_shared_settings(service: ConfigService) -> None:
    stored = service.store.applied()
    assert stored is not None
    assert "listeners" not in stored.document
    assert "admin" not in stored.document
    assert set(stored.document["gateway"]) == {"admin_address", "banner"}
    # ... and the node sees its whole document
    assert service.applied().document["listeners"][0]["name"] == "mx"


def test_a_joining_node_runs_the_stores_configuration_with_its_own_listeners(
    tmp_path: Path, store_url: str, service: ConfigService
) -> None:
    set_relay(service, "relay=full")
    service.apply("alice")
    second, file_config = peer(tmp_path, store_url, "gw2", hosted_domains=["other.example"])
    revision, what = second.adopt_file(file_config, "file:gw2.yaml")
    assert revision.number == 2  # its differing file did not become a revision
    assert "joins the store" in what
    assert "differ and are not used" in what
    assert revision.document["hosted_domains"] == ["example.com"]
    assert revision.document["listeners"][0]["address"] == "127.0.0.1:2600"
    assert revision.document["gateway"]["node"] == "gw2"
    assert relay_of(second, "applied") == "full"
    # the first node still sees its own listeners in the same revision
    assert service.applied().document["listeners"][0]["address"] == "127.0.0.1:2525"
    second.store.close()


def test_a_shared_edit_cannot_change_a_local_setting(service: ConfigService) -> None:
    def move(doc: dict[str, Any]) -> dict[str, Any]:
        doc["listeners"][0]["address"] = "127.0.0.1:1"
        doc["gateway"]["roles"] = ["internal"]
        return doc

    with pytest.raises(ConfigError) as caught:
        service.edit(move, "alice", "move")
    assert [p.path for p in caught.value.problems] == ["gateway.roles", "listeners"]
    assert all("node-local" in p.message for p in caught.value.problems)
    # a document without its local settings keeps this node's
    shared = {k: v for k, v in service.working()[0].items() if k not in ("listeners", "admin")}
    service.edit(lambda _old: shared, "alice", "whole document")
    assert service.working()[0]["listeners"][0]["address"] == "127.0.0.1:2525"


def test_an_import_keeps_this_nodes_local_settings(
    tmp_path: Path, store_url: str, service: ConfigService
) -> None:
    second, file_config = peer(tmp_path, store_url, "gw2")
    second.adopt_file(file_config, "file:gw2.yaml")
    exported = yaml.safe_load(second.export("applied"))  # gw2's listeners and name
    service.import_document(exported, "alice", force=True)
    assert service.diff() == []  # nothing of gw2's came in
    second.store.close()
