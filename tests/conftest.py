"""Shared fixtures: a real recording sink and a real gateway on loopback.

Everything here uses real sockets on 127.0.0.1/::1; the gateway and the sink
run in the test's own event loop (in-process) unless a test needs a separate
process (signals, memory), for which ``gateway_process`` exists.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
import yaml

from smtpgate.app import Gateway, build_gateway
from smtpgate.config import parse_config
from smtpgate.inbound.server import InboundServer
from smtpgate.sink import SinkBehaviour, build_sink

SMTPGATE = str(Path(sys.executable).with_name("smtpgate"))
# The tests run as root here: let `smtpgate serve` do so without gateway.user
# (test_privilege_drop.py takes this away to see the refusal and the drop).
os.environ.setdefault("SMTPGATE_ALLOW_ROOT", "1")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked ``both_loops`` run on asyncio's loop and on uvloop, which
    `smtpgate serve` uses and which differs in edge cases (writes on closed
    transports raise)."""
    if item.get_closest_marker("both_loops"):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@dataclass
class SinkHandle:
    port: int
    directory: Path
    behaviour: SinkBehaviour
    server: InboundServer

    def messages(self) -> list[tuple[dict[str, Any], bytes]]:
        """(envelope, body) of every stored message, oldest first."""
        metas = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        return [(json.loads(m.read_text()), m.with_suffix(".eml").read_bytes()) for m in metas]

    async def wait_for(self, count: int, timeout: float = 15) -> list[tuple[dict[str, Any], bytes]]:
        """Wait until ``count`` messages have arrived (delivery is asynchronous)."""
        deadline = time.monotonic() + timeout
        while len(found := self.messages()) < count and time.monotonic() < deadline:  # noqa: ASYNC110 - files written by another server; nothing to wait on
            await asyncio.sleep(0.05)
        return found


async def start_sink(directory: Path) -> SinkHandle:
    """A recording sink on a free loopback port, writing to ``directory``."""
    behaviour = SinkBehaviour(directory, fsync=False)
    server = build_sink("127.0.0.1", 0, behaviour)
    await server.start()
    return SinkHandle(server.bound_ports()["sink"], behaviour.directory, behaviour, server)


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SinkHandle]:
    handle = await start_sink(tmp_path / "sink")
    yield handle
    await handle.server.stop(1)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (lists are replaced)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def base_config(data_dir: Path, sink_port: int) -> dict[str, Any]:
    return {
        "gateway": {
            "hostname": "gw.test",
            "node": "gw1",
            "data_dir": str(data_dir),
            "admin_address": "postmaster@example.com",
        },
        "queue": {"retry": {"first": 0.5, "max_backoff": 2}, "connection_cache_time": 0.5},
        "admin": {"listen": ""},  # API tests turn it on with a free port
        "hosted_domains": ["example.com", "example.org"],
        "listeners": [{"name": "mx", "address": "127.0.0.1:0", "security": "none"}],
        "send_connectors": [
            {
                "name": "to-sink",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink_port}},
                "security": "none",
                "namespaces": [
                    {"sender": "*", "recipient": "example.com"},
                    {"sender": "*", "recipient": "example.org"},
                ],
            }
        ],
    }


@dataclass
class GatewayHandle:
    gateway: Gateway
    ports: dict[str, int]

    @property
    def port(self) -> int:
        return self.ports["mx"]


GatewayFactory = Callable[..., Awaitable[GatewayHandle]]


@pytest.fixture
async def gateway_factory(tmp_path: Path, sink: SinkHandle) -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def start(**overrides: Any) -> GatewayHandle:
        document = merge(base_config(tmp_path / f"gw{len(started)}", sink.port), overrides)
        gateway = await build_gateway(parse_config(document))
        await gateway.start()
        started.append(gateway)
        return GatewayHandle(gateway, gateway.server.bound_ports())

    yield start
    for gateway in started:
        await gateway.stop(1)


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> GatewayHandle:
    return await gateway_factory()


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("gw.test", "localhost", "127.0.0.1", "::1")
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "gw.pem", directory / "gw.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    with cert_file.open("wb") as out:
        for blob in leaf.cert_chain_pems:
            out.write(blob.bytes())
    key_file.chmod(0o600)
    return Certs(ca, ca_file, cert_file, key_file)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def worker_pids(supervisor: int) -> dict[int, int]:
    """The worker processes of ``smtpgate serve`` (``gateway.workers`` > 1) by index,
    from their command lines."""
    found: dict[int, int] = {}
    for child in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv:
            found[int(argv[argv.index(b"--index") + 1])] = int(child)
    return found


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    config_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start ``smtpgate serve`` as a real process (for signals and memory)."""
    running: list[GatewayProcess] = []

    def start(sink_port: int, **overrides: Any) -> GatewayProcess:
        port = free_port()
        document = merge(base_config(tmp_path / "gwp", sink_port), overrides)
        document["listeners"][0]["address"] = f"127.0.0.1:{port}"
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(document))
        process = subprocess.Popen(
            [SMTPGATE, "serve", "--config", str(path), "--log-level", "warning"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ},
        )
        handle = GatewayProcess(process, port, path)
        running.append(handle)
        try:
            wait_for_port(port, timeout=30, alive=lambda: process.poll() is None)
        except TimeoutError:
            process.kill()
            _, err = process.communicate()
            raise TimeoutError(f"smtpgate serve did not start: {err.decode()[-2000:]}") from None
        return handle

    yield start
    for handle in running:
        if handle.process.poll() is None:
            handle.process.kill()
            handle.process.wait()


@pytest.fixture(scope="session")
def swaks() -> str:
    path = shutil.which("swaks")
    assert path, "swaks is required (apt-get install swaks); .ci/run installs it"
    return path


async def run_tool(*argv: str, timeout: float = 60) -> tuple[int, str]:
    """Run a command without blocking the event loop; (exit code, combined output)."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode or 0, out.decode("utf-8", "replace")
