"""The configuration store on PostgreSQL: writers serialise, the password comes
from a private file and never shows, an unreachable or malformed URL is one
clear error naming the field. Against a real private PostgreSQL
(``tests/postgres.py``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from smtpgate.admin.services import ConfigService
from smtpgate.config.load import parse_config
from smtpgate.config.store import ConfigStore, record_location, store_exists
from smtpgate.errors import AdminError, ConfigError, Conflict
from tests import postgres as private_postgres
from tests.postgres import PASSWORD, PASSWORD_ROLE, Postgres, free_port
from tests.test_config_store import document

postgres = private_postgres.postgres  # the fixtures
postgres_url = private_postgres.postgres_url


def open_service(data_dir: Path, url: str, password_file: Path | None = None) -> ConfigService:
    return ConfigService(ConfigStore.open(data_dir, url, password_file), data_dir)


def add_domain(domain: str) -> Any:
    def change(doc: dict[str, Any]) -> dict[str, Any]:
        doc["hosted_domains"] = [*doc["hosted_domains"], domain]
        return doc

    return change


def test_two_writers_serialise_and_the_stale_one_is_refused(
    tmp_path: Path, postgres_url: str
) -> None:
    first = open_service(tmp_path, postgres_url)
    first.adopt_file(parse_config(document(tmp_path)), "file:g.yaml")
    second = open_service(tmp_path, postgres_url)
    version = first.edit(add_domain("a.example"), "alice", "edit").version
    inside = threading.Event()
    outcome: list[object] = []

    def slow_writer() -> None:
        store = first.store
        with store.transaction() as connection:
            draft = store.draft(connection)
            assert draft is not None
            doc = add_domain("b.example")(draft.document)
            store.save_draft(connection, doc, "alice", base_revision=1, expected_version=version)
            inside.set()
            time.sleep(0.5)  # holds the write lock

    def other_writer() -> None:
        inside.wait()
        started = time.monotonic()
        try:
            second.edit(add_domain("c.example"), "bob", "edit", version)
        except Conflict as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - started)

    threads = [threading.Thread(target=slow_writer), threading.Thread(target=other_writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert isinstance(outcome[0], Conflict)  # it read the version after the first committed
    assert outcome[1] >= 0.3  # type: ignore[operator] # it waited for the lock
    # the draft has the first writer's edit, not the second's
    assert second.view("draft")["hosted_domains"] == ["example.com", "a.example", "b.example"]
    first.store.close()
    second.store.close()


def test_concurrent_edits_are_none_lost(tmp_path: Path, postgres_url: str) -> None:
    first = open_service(tmp_path, postgres_url)
    first.adopt_file(parse_config(document(tmp_path)), "file:g.yaml")  # notes the node's settings
    services = [first, open_service(tmp_path, postgres_url)]
    errors: list[BaseException] = []

    def editor(index: int) -> None:
        try:
            for n in range(8):
                services[index].edit(add_domain(f"d{index}-{n}.example"), f"e{index}", "edit")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=editor, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    domains = services[0].view("draft")["hosted_domains"]
    assert sorted(domains) == sorted(
        ["example.com"] + [f"d{i}-{n}.example" for i in range(2) for n in range(8)]
    )
    assert services[0].store.draft().version == 16  # type: ignore[union-attr]
    for service in services:
        service.store.close()


def password_url(postgres: Postgres, postgres_url: str) -> str:
    database = postgres_url.rsplit("/", 1)[1]
    return postgres.url(database, user=PASSWORD_ROLE)


def test_the_password_comes_from_a_private_file(
    tmp_path: Path, postgres: Postgres, postgres_url: str
) -> None:
    url = password_url(postgres, postgres_url)
    secret = tmp_path / "store.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    service = open_service(tmp_path, url, secret)
    service.adopt_file(parse_config(document(tmp_path)), "file:g.yaml")
    assert service.store.applied_number() == 1
    service.store.close()
    # without it the server refuses: a clear error, no traceback, no password
    with pytest.raises(AdminError, match="configuration store unreachable") as refused:
        ConfigStore.open(tmp_path, url)
    assert f"{PASSWORD_ROLE}@127.0.0.1:{postgres.port}" in str(refused.value)


def test_a_password_file_others_can_read_is_refused(
    tmp_path: Path, postgres: Postgres, postgres_url: str
) -> None:
    secret = tmp_path / "store.password"
    secret.write_text(PASSWORD)
    secret.chmod(0o644)
    with pytest.raises(ConfigError) as refused:
        ConfigStore.open(tmp_path, password_url(postgres, postgres_url), secret)
    [problem] = refused.value.problems
    assert problem.path == "gateway.store_password_file"
    assert "readable by other users (mode 0644)" in problem.message
    assert PASSWORD not in str(refused.value)
    # loading the configuration names the field as well
    gateway = {"data_dir": str(tmp_path), "store_password_file": str(secret)}
    with pytest.raises(ConfigError) as loading:
        parse_config(document(tmp_path, gateway=gateway))
    assert [p.path for p in loading.value.problems] == ["gateway.store_password_file"]


def test_a_wrong_password_never_shows(
    tmp_path: Path, postgres: Postgres, postgres_url: str
) -> None:
    secret = tmp_path / "store.password"
    secret.write_text("Wrong-Horse-Battery")
    secret.chmod(0o600)
    with pytest.raises(AdminError) as refused:
        ConfigStore.open(tmp_path, password_url(postgres, postgres_url), secret)
    text = str(refused.value)
    assert text.startswith("configuration store unreachable: postgresql+psycopg://gate:***@")
    assert "password authentication failed" in text
    assert "Wrong-Horse-Battery" not in text
    assert PASSWORD not in text


def test_an_unreachable_store_is_one_clear_error(tmp_path: Path) -> None:
    url = f"postgresql://gate@127.0.0.1:{free_port()}/config?connect_timeout=3"
    with pytest.raises(AdminError) as refused:
        ConfigStore.open(tmp_path, url)
    text = str(refused.value)
    assert text.startswith("configuration store unreachable: postgresql+psycopg://gate@127.0.0.1:")
    assert "Traceback" not in text
    assert "\n" not in text


def test_libpq_tls_parameters_pass_through(tmp_path: Path, postgres_url: str) -> None:
    """``sslmode`` in the URL reaches libpq: the test server has no TLS, so
    requiring it fails, saying so."""
    with pytest.raises(AdminError, match="server does not support SSL"):
        ConfigStore.open(tmp_path, postgres_url + "?sslmode=require")
    ConfigStore.open(tmp_path, postgres_url + "?sslmode=disable").close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://db/config", "mysql://… is not a store URL"),
        ("config.db", "'config.db' is not a store URL"),
        (
            "postgresql://gate:hunter2@db/config",
            "postgresql://gate:***@db/config: the URL must not",
        ),
    ],
)
def test_a_bad_store_url_names_the_field(tmp_path: Path, url: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(document(tmp_path, gateway={"data_dir": str(tmp_path), "store": url}))
    assert "gateway.store" in str(refused.value)
    assert says in str(refused.value)
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"gateway\.store"):
        ConfigStore.open(tmp_path, url)


def test_the_data_directory_notes_where_the_store_is(tmp_path: Path, postgres_url: str) -> None:
    """``serve`` notes a PostgreSQL store in data_dir; the API process and the CLI,
    which only know the data directory, open the same one."""
    assert not store_exists(tmp_path)
    record_location(tmp_path, postgres_url, None)
    assert store_exists(tmp_path)
    service = open_service(tmp_path, postgres_url)
    service.adopt_file(parse_config(document(tmp_path)), "file:g.yaml")
    located = ConfigStore.open(tmp_path)
    assert located.applied_number() == 1
    assert not (tmp_path / "config.db").exists()
    located.close()
    service.store.close()
    record_location(tmp_path, "", None)  # back to the default: the note goes
    assert not store_exists(tmp_path)
