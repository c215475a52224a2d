"""`smtpgate serve` on a PostgreSQL configuration store, end to end: the gateway,
its API process and the CLI all reach the same database, `config apply` is
enforced, and mail still relays. Against a real private PostgreSQL."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from smtpgate.config.store import ConfigStore
from tests import postgres as private_postgres
from tests.conftest import GatewayProcess, SinkHandle, base_config, free_port, merge
from tests.integration.conftest import make_token
from tests.integration.test_apply_enforced import cli, greeting

postgres = private_postgres.postgres  # the fixtures
postgres_url = private_postgres.postgres_url


async def test_serve_apply_and_relay_on_postgresql(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle, postgres_url: str
) -> None:
    api_port = free_port()
    gateway = gateway_process(
        sink.port,
        spoof_detection=False,
        gateway={"store": postgres_url},
        admin={"listen": f"127.0.0.1:{api_port}"},
        connection_profiles=[{"name": "apps", "client_hosts": ["127.0.0.2"], "relay": "full"}],
    )
    data_dir = gateway.config_path.parent / "gwp"
    assert not (data_dir / "config.db").exists()  # the store is the database
    assert greeting(gateway.port) == 220

    assert cli(gateway.config_path, "profile", "set", "apps", "relay=blocked").returncode == 0
    done = cli(gateway.config_path, "config", "apply")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gw1: applied (running revision 2)" in done.stdout
    assert greeting(gateway.port) == 554

    # the API process, started with only --data-dir, reads the same database
    token = make_token(gateway.config_path)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}/api/v1") as client:
        response = await client.get("/status", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.json()["running_revision"] == 2

    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.sendmail("bob@example.org", ["alice@example.com"], b"Subject: pg\r\n\r\nhello\r\n")
    [(_envelope, body)] = await sink.wait_for(1)
    assert b"hello" in body

    store = ConfigStore.open(data_dir, postgres_url)
    try:
        assert store.applied_number() == 2
        assert "apply" in [e.action for e in store.audit_log()]
    finally:
        store.close()


def file_with_store(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "gateway.yaml"
    document = merge(base_config(tmp_path / "var", 2526), {"gateway": {"store": url}})
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_cli_uses_the_files_store_before_the_first_serve(
    tmp_path: Path, postgres_url: str
) -> None:
    path = file_with_store(tmp_path, postgres_url)
    done = cli(path, "config", "import", str(path))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "var" / "config.db").exists()  # not a SQLite store beside it
    store = ConfigStore.open(tmp_path / "var", postgres_url)
    try:
        assert store.draft() is not None
    finally:
        store.close()


def test_an_unreachable_store_is_one_line_from_the_cli(tmp_path: Path) -> None:
    path = file_with_store(tmp_path, f"postgresql://gate@127.0.0.1:{free_port()}/config")
    done = cli(path, "config", "diff")
    assert done.returncode == 1
    assert done.stderr.startswith(
        "smtpgate: configuration store unreachable: postgresql+psycopg://gate@127.0.0.1:"
    )
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_while_postgresql_is_down_the_api_says_so_and_mail_still_relays(
    gateway_process: Callable[..., GatewayProcess],
    sink: SinkHandle,
    postgres: private_postgres.Postgres,
    postgres_url: str,
) -> None:
    api_port = free_port()
    gateway = gateway_process(
        sink.port,
        spoof_detection=False,
        gateway={"store": postgres_url},
        admin={"listen": f"127.0.0.1:{api_port}"},
    )
    token = make_token(gateway.config_path)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}/api/v1") as client:
        assert (await client.get("/status", headers=headers)).status_code == 200
        postgres.pause()
        try:
            response = await client.get("/status", headers=headers)
            assert response.status_code == 503, response.text
            assert "configuration store is unreachable" in response.json()["detail"]
            assert "Traceback" not in response.text
            with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as smtp:
                smtp.sendmail(
                    "bob@example.org", ["alice@example.com"], b"Subject: x\r\n\r\ndown\r\n"
                )
            [(_envelope, body)] = await sink.wait_for(1)
            assert b"down" in body
        finally:
            postgres.resume()
        response = await client.get("/status", headers=headers)
        assert response.status_code == 200, response.text
