"""``smtpgate cluster status|forget`` and ``GET /api/v1/cluster``: which gateways
report to this configuration store, what they run, and removing one that left."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from smtpgate.admin import nodes
from smtpgate.config.store import ConfigStore
from smtpgate.errors import Conflict, NotFound
from tests.conftest import SMTPGATE, GatewayProcess, SinkHandle


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
