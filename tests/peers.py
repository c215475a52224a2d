"""Peer gateways for tests: several real ``smtpgate serve`` processes on
loopback sharing one configuration store (a private PostgreSQL database).

Each node has a directory of its own standing for its host: its YAML file,
its ``data_dir``, its log, and the working directory of its processes (so a
relative path in the shared configuration can name a file one node has and
another has not). Every node gets the cluster's secret key through
``smtpgate cluster key import``, as an administrator would install it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.fernet import Fernet

from smtpgate.admin import nodes
from smtpgate.config.store import ConfigStore
from tests.conftest import SMTPGATE, base_config, free_port, merge, wait_for_port
from tests.postgres import Postgres


@dataclass
class Node:
    """One peer: its own file, data directory, SMTP port and log."""

    name: str
    directory: Path
    port: int
    document: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.directory / "gateway.yaml"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / f"serve-{self.starts}.log"

    def write(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.document))

    def cli(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``smtpgate ARGV --config FILE`` on this node's host."""
        return subprocess.run(
            [SMTPGATE, *argv, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.directory,
            timeout=timeout,
        )

    def launch(self) -> None:
        """Start ``smtpgate serve`` without waiting for it (see ``ready``)."""
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [SMTPGATE, "serve", "--config", str(self.config_path), "--log-level", "info"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )

    def ready(self, timeout: float = 30) -> None:
        process = self.process
        assert process is not None
        try:
            wait_for_port(self.port, timeout, alive=lambda: process.poll() is None)
        except TimeoutError:
            process.kill()
            process.wait()
            raise AssertionError(f"{self.name} did not start:\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit; the exit code."""
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class Cluster:
    """Nodes sharing the store ``url``; ``shared`` is every file's shared part."""

    root: Path
    url: str
    sink_port: int
    shared: dict[str, Any] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_file = self.root / "cluster.key"
        self.key_file.write_bytes(Fernet.generate_key() + b"\n")
        self.key_file.chmod(0o600)

    def node(self, name: str, *, key: Path | None = None, **local: Any) -> Node:
        """A node's file (``local``: its node-local settings), with the cluster's
        key (or ``key``) imported; not started."""
        directory = self.root / name
        directory.mkdir()
        port = free_port()
        document = merge(base_config(directory / "data", self.sink_port), self.shared)
        document = merge(
            document,
            {
                "gateway": {"node": name, "store": self.url},
                "listeners": [{"name": "mx", "address": f"127.0.0.1:{port}", "security": "none"}],
            },
        )
        node = Node(name, directory, port, merge(document, local))
        node.write()
        imported = node.cli("cluster", "key", "import", str(key or self.key_file), "--force")
        assert imported.returncode == 0, imported.stderr
        self.nodes.append(node)
        return node

    def start(self, *started: Node, timeout: float = 30) -> None:
        """Start ``started`` at once; return when each listens and has reported."""
        for node in started:
            node.launch()
        for node in started:
            node.ready(timeout)
        self.wait_reported(*started, timeout=timeout)

    def wait_reported(self, *started: Node, timeout: float = 30) -> None:
        """Until each of ``started`` (its current process) has reported to the store."""
        pids = {n.name: n.process.pid for n in started if n.process is not None}
        deadline = time.monotonic() + timeout
        with self.store() as store:
            while True:
                found = nodes.reports(store)
                if all(found.get(name, {}).get("pid") == pid for name, pid in pids.items()):
                    return
                logs = "".join(f"\n--- {n.name}:\n{n.log()[-1500:]}" for n in started)
                missing = f"not all of {sorted(pids)} reported: {found}{logs}"
                assert time.monotonic() < deadline, missing
                time.sleep(0.05)

    @contextmanager
    def store(self) -> Iterator[ConfigStore]:
        store = ConfigStore.open(self.root, self.url)
        try:
            yield store
        finally:
            store.close()

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


def pg_stop(postgres: Postgres) -> None:
    postgres.run(str(postgres.bin / "pg_ctl"), "-D", str(postgres.directory / "data"), "-m",
                 "fast", "-w", "stop")  # fmt: skip


def pg_start(postgres: Postgres) -> None:
    """Start the instance ``pg_stop`` stopped, with the options it had
    (``tests.postgres.Postgres.start``)."""
    options = (
        f"-c listen_addresses=127.0.0.1 -p {postgres.port} "
        f"-c unix_socket_directories={postgres.directory} -c fsync=off -c max_connections=200"
    )
    postgres.run(
        str(postgres.bin / "pg_ctl"), "-D", str(postgres.directory / "data"), "-o", options,
        "-l", str(postgres.directory / "log"), "-w", "start",
    )  # fmt: skip
