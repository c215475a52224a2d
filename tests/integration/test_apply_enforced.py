"""After `config apply` says "applied", every new connection gets the new policy.

A real `smtpgate serve` and the real CLI: apply, then connect at once. The
first version returned as soon as the revision was stored, while the gateway
noticed it up to 0.25 s later; 8 clients in 10 were served by the old one."""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from smtpgate.admin import nodes
from smtpgate.config.store import ConfigStore
from tests.conftest import SMTPGATE, GatewayProcess, SinkHandle, base_config


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SMTPGATE, *argv, "--config", str(config)], capture_output=True, text=True, check=False
    )


def greeting(port: int) -> int:
    client = smtplib.SMTP(timeout=10)
    try:
        code, _ = client.connect("127.0.0.1", port, source_address=("127.0.0.2", 0))
    except smtplib.SMTPConnectError as refused:
        return refused.smtp_code
    finally:
        client.close()
    return code


def test_a_new_connection_after_apply_gets_the_new_policy(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    gateway = gateway_process(
        sink.port,
        connection_profiles=[{"name": "apps", "client_hosts": ["127.0.0.2"], "relay": "full"}],
    )
    assert greeting(gateway.port) == 220
    seen = []
    for turn in range(10):
        relay, expected = ("blocked", 554) if turn % 2 == 0 else ("full", 220)
        assert cli(gateway.config_path, "profile", "set", "apps", f"relay={relay}").returncode == 0
        done = cli(gateway.config_path, "config", "apply")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "gw1: applied (running revision" in done.stdout
        seen.append((greeting(gateway.port), expected))
    assert [code for code, _ in seen] == [expected for _, expected in seen]


def test_apply_with_no_gateway_running_says_so(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path / "var", 2526)))
    assert cli(path, "config", "import", str(path)).returncode == 0
    done = cli(path, "config", "apply")
    assert done.returncode == 0
    assert "no gateway is running on this store: it takes effect when one starts" in done.stdout


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def store(tmp_path: Path) -> ConfigStore:
    return ConfigStore.open(tmp_path)


def test_wait_reports_each_node_applied_failed_down_or_late(store: ConfigStore) -> None:
    clock = Clock()
    nodes.publish(store, "a", {"running_revision": 5}, clock.now)
    nodes.publish(store, "b", {"running_revision": 4, "refused_revision": 5, "error": "cert"}, 1000)
    nodes.publish(store, "c", {"running_revision": 4}, clock.now - nodes.STALE_AFTER - 1)
    nodes.publish(store, "d", {"running_revision": 4}, clock.now)
    found = nodes.wait_applied(store, 5, 2.0, clock=clock, sleep=clock.sleep)
    assert [str(o) for o in found] == [
        "a: applied (running revision 5)",
        "b: failed (cert)",
        "c: down (last seen 9 s ago)",
        "d: not answering (still on revision 4 after 2 s)",
    ]
    assert clock.now >= 1002.0  # it waited for d until the timeout
    assert nodes.apply_report(found)["complete"] is False


def test_wait_returns_as_soon_as_every_live_node_runs_the_revision(store: ConfigStore) -> None:
    clock = Clock()
    nodes.publish(store, "a", {"running_revision": 6}, clock.now)
    found = nodes.wait_applied(store, 5, 10.0, clock=clock, sleep=clock.sleep)
    assert clock.now == 1000.0
    assert nodes.apply_report(found) == {
        "nodes": [{"node": "a", "state": "applied", "detail": "running revision 6"}],
        "complete": True,
    }
