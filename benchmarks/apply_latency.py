"""Peer gateways on PostgreSQL: how long an apply takes to be in force on every node,
and what the PostgreSQL store costs relay throughput.

A private PostgreSQL (tests/postgres.py) and three ``smtpgate serve`` nodes on
loopback sharing it (tests/peers.py: each its own file, data directory and
port). Node 1's administrator toggles a profile's relay ``--applies`` times;
the time measured runs from the start of the apply (the store transaction that
adds the revision) until every node's report (meta ``node:*``, written after
the node swapped its policy) says it runs the new revision: PostgreSQL's
NOTIFY, each node's swap and its report. The goal is a median under 0.3 s.
The same applies through the CLI (``smtpgate config apply``, which waits for
every node) are timed too, beside ``smtpgate config diff`` for what starting
the CLI and opening the store cost of that.

Then the relay of one node (relay.py's load: smtp-source → smtpgate →
smtp-sink, one message per connection and with reuse) with its configuration
store on PostgreSQL and on SQLite; the store is off the message path, so the
two should match. ``--messages 0`` skips it.

Needs root (PostgreSQL runs as ``nobody``), Debian's postgresql and postfix
(smtp-source, smtp-sink), and the project installed.

Usage: ``python benchmarks/apply_latency.py [--applies N] [--messages N] [--sessions N]``
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import free_port, wait_for
from relay import BIN, Sink, run_load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.peers import Cluster, Node
from tests.postgres import USER, Postgres, binaries

from smtpgate.admin import nodes
from smtpgate.admin.services import ConfigService

GOAL = 0.3  # seconds: the median apply, until every node runs it


def start_postgres() -> Postgres:
    directory = Path(tempfile.mkdtemp(prefix="smtpgate-bench-postgres-"))
    owner = pwd.getpwnam(USER)
    os.chown(directory, owner.pw_uid, owner.pw_gid)
    server = Postgres(directory, free_port(), binaries())
    server.start()
    return server


def toggle(document: dict[str, object], relay: str) -> dict[str, object]:
    for profile in document["connection_profiles"]:  # type: ignore[attr-defined]
        if profile["name"] == "apps":
            profile["relay"] = relay
    return document


def until_everywhere(cluster: Cluster, revision: int, timeout: float = 30) -> None:
    """Return once every node reports running ``revision``."""
    names = {n.name for n in cluster.nodes}
    deadline = time.monotonic() + timeout
    with cluster.store() as store:
        while True:
            found = nodes.reports(store)
            running = {name: found.get(name, {}).get("running_revision") for name in names}
            if all(isinstance(r, int) and r >= revision for r in running.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"revision {revision} not everywhere: {running}")
            time.sleep(0.002)


def apply_latencies(cluster: Cluster, first: Node, applies: int) -> list[float]:
    """In-process applies on ``first``'s store: start of apply → every node runs it."""
    with cluster.store() as store:
        service = ConfigService(store, first.data_dir)
        took = []
        for turn in range(applies):
            relay = "blocked" if turn % 2 == 0 else "full"
            service.edit(lambda d, relay=relay: toggle(d, relay), "bench", "toggle apps")
            started = time.perf_counter()
            revision = service.apply("bench", f"toggle {turn}").revision
            until_everywhere(cluster, revision)
            took.append(time.perf_counter() - started)
    return took


def cli_applies(first: Node, applies: int) -> list[float]:
    """``smtpgate config apply`` on node 1, wall time (interpreter start included)."""
    took = []
    for turn in range(applies):
        relay = "blocked" if turn % 2 == 0 else "full"
        done = first.cli("profile", "set", "apps", f"relay={relay}")
        assert done.returncode == 0, done.stderr
        started = time.perf_counter()
        done = first.cli("config", "apply")
        took.append(time.perf_counter() - started)
        if done.returncode != 0 or done.stdout.count(": applied (running revision") != 3:
            raise RuntimeError(f"apply incomplete:\n{done.stdout}{done.stderr}")
    return took


def cli_baseline(first: Node, runs: int) -> list[float]:
    """``smtpgate config diff`` on node 1: starting the CLI and opening the store."""
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        done = first.cli("config", "diff")
        took.append(time.perf_counter() - started)
        assert done.returncode == 0, done.stderr
    return took


def line(label: str, took: list[float], *, goal: bool = True) -> str:
    p50 = statistics.median(took)
    verdict = "ok" if p50 < GOAL else "MISSED"
    text = f"{label:<38} p50 {p50 * 1000:7.1f} ms   max {max(took) * 1000:7.1f} ms"
    return text + (f"   (goal p50 < {GOAL * 1000:.0f} ms: {verdict})" if goal else "")


def relay_rates(directory: Path, store: str, sink: Sink, args: argparse.Namespace) -> str:
    """relay.py's load against one node whose store is ``store`` ("" = SQLite)."""
    port = free_port()
    config = {
        "gateway": {"hostname": "gw.bench", "data_dir": str(directory / "data"), "store": store},
        "hosted_domains": ["bench.example"],
        "spoof_detection": False,
        "listeners": [{"name": "mx", "address": f"127.0.0.1:{port}", "security": "none"}],
        "limits": {"max_connections_per_ip": 1000},
        "admin": {"listen": ""},
        "connection_profiles": [
            {"name": "loopback", "client_hosts": ["127.0.0.0/8"], "relay": "full"}
        ],
        "send_connectors": [
            {
                "name": "sink",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
            }
        ],
    }
    directory.mkdir()
    path = directory / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [BIN, "serve", "--config", str(path), "--log-level", "warning"], stderr=subprocess.DEVNULL
    )
    try:
        wait_for(port)
        single = run_load(port, sink, args, reuse=False)
        reused = run_load(port, sink, args, reuse=True)
    finally:
        process.terminate()
        process.wait(60)
    return f"{single:>10.0f}/s{reused:>10.0f}/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--applies", type=int, default=20)
    parser.add_argument("--cli-applies", type=int, default=5)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000)
    args = parser.parse_args()
    print(f"3 nodes on one private PostgreSQL, {os.cpu_count()} cores")
    postgres = start_postgres()
    root = Path(tempfile.mkdtemp(prefix="smtpgate-bench-peers-"))
    try:
        url = postgres.create_database("bench")
        shared = {
            "connection_profiles": [
                {"name": "apps", "client_hosts": ["127.0.0.2"], "relay": "full"}
            ]
        }
        cluster = Cluster(root / "cluster", url, free_port(), shared)
        try:
            first, *others = (cluster.node(f"gw{i}") for i in (1, 2, 3))
            cluster.start(first)
            cluster.start(*others)
            took = apply_latencies(cluster, first, args.applies)
            print(line(f"{args.applies} applies, until all 3 run it", took), flush=True)
            if args.cli_applies:
                took = cli_applies(first, args.cli_applies)
                label = f"{args.cli_applies} x `smtpgate config apply`"
                print(line(label, took, goal=False), flush=True)
                took = cli_baseline(first, args.cli_applies)
                label = f"{args.cli_applies} x `smtpgate config diff` (CLI start)"
                print(line(label, took, goal=False), flush=True)
        finally:
            cluster.close()
        if args.messages:
            print(
                f"\nrelay, one node: {args.messages} messages of {args.size} bytes, "
                f"{args.sessions} parallel sessions, delivered to smtp-sink"
            )
            print(f"{'configuration store':<22}{'1 msg/conn':>14}{'reuse (-d)':>14}")
            sink = Sink()
            try:
                database = postgres.create_database("relay")
                rates = relay_rates(root / "relay-pg", database, sink, args)
                print(f"{'PostgreSQL':<22}{rates}", flush=True)
                rates = relay_rates(root / "relay-sqlite", "", sink, args)
                print(f"{'SQLite':<22}{rates}", flush=True)
            finally:
                sink.stop()
    finally:
        postgres.stop()
        shutil.rmtree(postgres.directory, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
