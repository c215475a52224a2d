"""``smtpgate cluster status|forget`` and ``GET /api/v1/cluster``: which gateways
report to this configuration store, what they run, and removing one that left."""

from __future__ import annotations

import json
import smtplib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from smtpgate.admin import nodes
from smtpgate.config.store import ConfigStore
from smtpgate.errors import Conflict, NotFound
from tests.conftest import SMTPGATE, GatewayProcess, SinkHandle, wait_for_port


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SMTPGATE, *argv, "--config", str(config)], capture_output=True, text=True, check=False
    )


def test_cluster_status_lists_the_running_gateway_and_forget_needs_force(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    gateway = gateway_process(sink.port, gateway={"roles": ["internet"]})
    done = cli(gateway.config_path, "cluster", "status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "applied revision: 1"
    assert lines[1].startswith("gw1: up (seen ")
    assert "revision 1, queue 0, roles internet" in lines[1]
    found = json.loads(cli(gateway.config_path, "cluster", "status", "--json").stdout)
    [node] = found["nodes"]
    assert (node["state"], node["lag"], node["roles"]) == ("up", 0, ["internet"])
    assert node["version"]
    refused = cli(gateway.config_path, "cluster", "forget", "gw1")
    assert refused.returncode != 0
    assert "node 'gw1' is up" in refused.stderr
    unknown = cli(gateway.config_path, "cluster", "forget", "gw9")
    assert unknown.returncode != 0
    assert "no node 'gw9' has reported to this store" in unknown.stderr


@pytest.fixture
def store(tmp_path: Path) -> ConfigStore:
    return ConfigStore.open(tmp_path)


def test_nodes_are_up_stale_or_down_by_their_last_heartbeat(store: ConfigStore) -> None:
    now = 5000.0
    nodes.publish(store, "a", {"running_revision": 3}, now - 1)
    nodes.publish(store, "b", {"running_revision": 2, "error": "cert"}, now - 20)
    nodes.publish(store, "c", {"running_revision": 1}, now - 600)
    found = nodes.cluster(store, now)
    assert [(n["node"], n["state"], n["error"]) for n in found["nodes"]] == [
        ("a", "up", None),
        ("b", "stale", "cert"),
        ("c", "down", None),
    ]
    with pytest.raises(Conflict):
        nodes.forget(store, "a", now)
    nodes.forget(store, "c", now)
    nodes.forget(store, "a", now, force=True)
    assert [n["node"] for n in nodes.cluster(store, now)["nodes"]] == ["b"]
    with pytest.raises(NotFound):
        nodes.forget(store, "c", now)


def test_a_node_restarted_while_the_store_is_down_runs_its_last_revision_then_catches_up(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    """The store is down (here: its database cannot be opened). The node starts
    with the revision it ran last, not with the file, keeps relaying, and
    follows the store again once it answers."""
    gateway = gateway_process(
        sink.port,
        connection_profiles=[{"name": "apps", "client_hosts": ["127.0.0.2"], "relay": "full"}],
    )
    assert cli(gateway.config_path, "profile", "set", "apps", "relay=blocked").returncode == 0
    assert cli(gateway.config_path, "config", "apply").returncode == 0  # revision 2
    assert gateway.stop() == 0
    data_dir = Path(yaml.safe_load(gateway.config_path.read_text())["gateway"]["data_dir"])
    database = data_dir / "config.db"
    database.rename(data_dir / "config.db.away")
    database.mkdir()  # what SQLite cannot open: the store is unreachable
    port = gateway.port  # revision 2's listener, from the node's own copy
    process = subprocess.Popen(
        [SMTPGATE, "serve", "--config", str(gateway.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_for_port(port, alive=lambda: process.poll() is None)
        except TimeoutError:
            process.kill()
            raise AssertionError(process.communicate()[0].decode()[-3000:]) from None
        assert greeting(port) == 554  # revision 2 (blocked), not the file's relay full
        database.rmdir()
        (data_dir / "config.db.away").rename(database)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = json.loads(cli(gateway.config_path, "cluster", "status", "--json").stdout)
            [node] = found["nodes"]
            if node["pid"] == process.pid:  # the restarted node reports again
                break
            time.sleep(0.5)
        assert node["running_revision"] == 2
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=30)
    log = out.decode()
    assert "the configuration store is unreachable" in log
    assert "running revision 2, the last this node ran, until it answers" in log
    assert "configuration store reachable again" in log


def greeting(port: int) -> int:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=("127.0.0.2", 0)):
            return 220
    except smtplib.SMTPConnectError as refused:
        return refused.smtp_code
