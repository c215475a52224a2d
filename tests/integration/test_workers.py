"""Several worker processes (``gateway.workers``) are one gateway from outside.

Workers are killed one at a time while clients send: every message that got
250 arrives, and the supervisor starts each worker again. Connection limits
count every worker's connections; the metrics count every worker's mail.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.conftest import (
    SMTPGATE,
    GatewayProcess,
    SinkHandle,
    base_config,
    free_port,
    merge,
    run_tool,
    worker_pids,
)
from tests.integration.acked import Senders, arrived
from tests.slowsink import SlowSink

SENDERS = 4
KILLS = 4


async def _workers(supervisor: int, count: int, timeout: float = 30) -> dict[int, int]:
    """The worker pids once ``count`` workers run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = worker_pids(supervisor)
        if len(found) == count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"not {count} workers: {worker_pids(supervisor)}")


async def test_workers_killed_one_at_a_time_lose_no_acknowledged_message(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    rng = random.Random(42)
    gw = gateway_process(sink.port, spoof_detection=False, gateway={"workers": 2})
    before = await _workers(gw.process.pid, 2)
    acked: list[str] = []
    senders = Senders(gw.port, SENDERS, "w", acked)
    try:
        for kill in range(KILLS):
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            index = kill % 2
            victim = (await _workers(gw.process.pid, 2))[index]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while worker_pids(gw.process.pid).get(index) in (None, victim):
                assert time.monotonic() < deadline, f"worker {index} was not started again"
                await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # the last worker started again takes mail too
    finally:
        await senders.stop()
    after = await _workers(gw.process.pid, 2)
    assert set(after.values()).isdisjoint(before.values())  # every worker was replaced
    assert gw.process.poll() is None  # the supervisor itself never stopped
    assert len(acked) > 50, "the test must actually send mail"
    found = await arrived(sink, acked)
    missing = sorted(set(acked) - found)
    print(f"workers: {KILLS} worker kills, {len(acked)} acknowledged, {len(found)} arrived")
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages were lost"
    # and the gateway still stops gracefully (in a thread: the sink answering the
    # deliveries still under way runs on this test's event loop)
    assert await asyncio.to_thread(gw.stop) == 0


def _greeting(port: int) -> tuple[socket.socket, bytes]:
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    return client, client.recv(200)


async def test_the_per_ip_limit_counts_every_workers_connections(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    gw = gateway_process(sink.port, gateway={"workers": 2}, limits={"max_connections_per_ip": 3})
    await _workers(gw.process.pid, 2)
    opened = [await asyncio.to_thread(_greeting, gw.port) for _ in range(8)]
    try:
        greetings = [greeting[:9] for _, greeting in opened]
        assert greetings.count(b"220 gw.te") == 3, greetings
        assert greetings.count(b"421 4.7.0") == 5, greetings
    finally:
        for client, _ in opened:
            client.close()
    await asyncio.sleep(0.5)  # closed: counted no more, whichever worker had them
    again = [await asyncio.to_thread(_greeting, gw.port) for _ in range(3)]
    try:
        assert [g[:3] for _, g in again] == [b"220"] * 3
    finally:
        for client, _ in again:
            client.close()


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_metrics_count_the_mail_of_every_worker(
    tmp_path: Path,
    gateway_process: Callable[..., GatewayProcess],
    sink: SinkHandle,
) -> None:
    gw = gateway_process(sink.port, spoof_detection=False, gateway={"workers": 2})
    await _workers(gw.process.pid, 2)
    count = 30
    for number in range(count):
        body = f"Subject: m\r\nMessage-ID: <m{number}@test>\r\n\r\nx\r\n".encode()
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
            await asyncio.to_thread(client.sendmail, "bob@example.org", ["a@example.com"], body)
    metrics = tmp_path / "gwp" / "metrics.prom"
    deadline = time.monotonic() + 30
    accepted = 0.0
    while time.monotonic() < deadline:
        text = metrics.read_text() if metrics.exists() else ""
        accepted = _metric(text, "smtpgate_messages_accepted_total")
        if accepted >= count:
            break
        await asyncio.sleep(0.2)
    assert accepted == count


def _allowed_cpus(pid: int) -> set[str]:
    """The CPU lists the threads of ``pid`` may run on (one per distinct list)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        found.add(re.search(r"Cpus_allowed_list:\s*(\S+)", status).group(1))  # type: ignore[union-attr]
    return found


async def test_pinned_workers_run_each_with_all_its_threads_on_its_own_cpu(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    """``gateway.cpu_affinity: per-core``: worker i and every thread it started
    run on the i-th CPU the gateway may use; a worker started again after a
    crash is pinned the same way. Mail still flows."""
    gw = gateway_process(
        sink.port, spoof_detection=False, gateway={"workers": 2, "cpu_affinity": "per-core"}
    )
    workers = await _workers(gw.process.pid, 2)
    cpus = sorted(os.sched_getaffinity(0))
    expected = {index: {str(cpus[index % len(cpus)])} for index in workers}
    body = b"Subject: pinned\r\nMessage-ID: <pinned@test>\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        await asyncio.to_thread(client.sendmail, "bob@example.org", ["a@example.com"], body)
    assert await arrived(sink, ["pinned"]) == {"pinned"}
    assert {i: _allowed_cpus(pid) for i, pid in workers.items()} == expected
    os.kill(workers[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker_pids(gw.process.pid).get(1) in (None, workers[1]):
        assert time.monotonic() < deadline, "worker 1 was not started again"
        await asyncio.sleep(0.05)
    again = (await _workers(gw.process.pid, 2))[1]
    while _allowed_cpus(again) != expected[1]:  # it pins itself first thing, once running
        assert time.monotonic() < deadline, f"worker 1 runs on {_allowed_cpus(again)}"
        await asyncio.sleep(0.05)
    assert os.sched_getaffinity(gw.process.pid) == set(cpus)  # the supervisor is not pinned


def test_workers_that_cannot_start_stop_serve_with_one_line_each(
    tmp_path: Path, sink: SinkHandle
) -> None:
    """Each worker opens the queue itself: when it cannot, ``serve`` exits 1 and
    says so, one line per worker and one for the gateway, without a traceback."""
    document = merge(base_config(tmp_path / "gw", sink.port), {"gateway": {"workers": 2}})
    document["listeners"][0]["address"] = f"127.0.0.1:{free_port()}"
    (tmp_path / "gw" / "queue" / "queue.db").mkdir(parents=True)  # not a database
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    argv = [SMTPGATE, "serve", "--config", str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    for index in (0, 1):
        assert f"smtpgate worker {index}: cannot start: [Errno 21] Is a directory" in done.stderr
    assert "smtpgate: cannot start: worker 0, 1 of 2 did not start" in done.stderr


async def test_cluster_status_shows_one_node_with_its_workers(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    gw = gateway_process(sink.port, gateway={"workers": 2})
    await _workers(gw.process.pid, 2)
    argv = [SMTPGATE, "cluster", "status", "--config", str(gw.config_path)]
    deadline = time.monotonic() + 20
    while True:
        code, out = await run_tool(*argv, "--json")
        assert code == 0, out
        [node] = json.loads(out)["nodes"]  # one node, not one per worker
        if node["pid"] == gw.process.pid or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert (node["pid"], node["workers"], node["state"]) == (gw.process.pid, 2, "up")
    code, text = await run_tool(*argv)
    assert "gw1: up" in text
    assert ", 2 workers" in text


async def test_next_hop_limits_are_shared_out_among_the_workers(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    """A concurrency rule of 4 for a slow next hop: each of two workers opens at
    most 2 connections, so the next hop never sees more than the 4 configured."""
    slow = SlowSink()
    await slow.start()
    try:
        slow.data_delay = 0.5
        rule = {"connector": "slow", "destination": "127.0.0.1:*", "concurrency": 4}
        gw = gateway_process(
            sink.port,
            spoof_detection=False,
            gateway={"workers": 2},
            queue={"shaping": [rule]},
            send_connectors=[
                {
                    "name": "slow",
                    "security": "none",
                    "deliver": {"smarthost": {"host": "127.0.0.1", "port": slow.port}},
                }
            ],
        )
        await _workers(gw.process.pid, 2)

        def client(number: int) -> None:
            for n in range(8):  # a connection each: both workers take some
                body = f"Subject: c{number}m{n}\r\n\r\nx\r\n".encode()
                with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as smtp:
                    smtp.sendmail("bob@example.org", ["alice@example.com"], body)

        await asyncio.gather(*(asyncio.to_thread(client, n) for n in range(6)))
        deadline = time.monotonic() + 60
        while len(slow.subjects) < 48:
            assert time.monotonic() < deadline, f"{len(slow.subjects)} of 48 arrived"
            await asyncio.sleep(0.05)
        assert 2 <= slow.most_open <= 4
    finally:
        await slow.stop()
