"""``/healthz`` and ``/readyz`` without a token, reflecting the gateway process
(its heartbeat) and its queue database, which the API process probes."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SinkHandle, worker_pids
from tests.integration.observing import Served, serve


@pytest.fixture
async def served(tmp_path: Path, sink: SinkHandle) -> AsyncIterator[Served]:
    handle = serve(tmp_path, sink.port)
    yield handle
    handle.stop()


async def ready(served: Served) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{served.api_port}/readyz")
    return response.status_code, response.json()


async def until(served: Served, status: int, timeout: float = 20) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        code, body = await ready(served)
        if code == status or asyncio.get_running_loop().time() > deadline:
            assert code == status, body
            return body
        await asyncio.sleep(0.2)


async def test_healthz_and_readyz_answer_without_a_token(served: Served) -> None:
    async with httpx.AsyncClient() as client:
        health = await client.get(f"http://127.0.0.1:{served.api_port}/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    body = await until(served, 200)
    assert body == {
        "ready": True,
        "checks": {
            "gateway": "ok",
            "listeners": "ok",
            "store": "ok",
            "workers": "ok",
            "queue": "ok",
        },
    }


async def test_not_ready_while_the_queue_database_cannot_be_written(served: Served) -> None:
    """Root ignores file modes, so the database is made unwritable the way that
    stops root too: another process holds its write lock."""
    await until(served, 200)
    holder = sqlite3.connect(served.data_dir / "queue" / "queue.db", isolation_level=None)
    try:
        holder.execute("begin exclusive")
        body = await until(served, 503)
        assert body["ready"] is False
        assert body["checks"]["queue"].startswith("the queue database is not writable")
        assert body["checks"]["gateway"] == "ok"
    finally:
        holder.execute("rollback")
        holder.close()
    await until(served, 200)


async def test_a_stuck_gateway_is_not_ready(served: Served) -> None:
    """The API answers from its own process; a gateway that stopped beating (here:
    stopped by SIGSTOP, its worker processes too) makes it answer 503, and ready
    again once it runs."""
    await until(served, 200)
    stuck = [served.process.pid, *worker_pids(served.process.pid).values()]
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    try:
        body = await until(served, 503, timeout=25)
        for _ in range(50):  # the workers' heartbeats age at different moments
            if body["checks"]["gateway"] != "ok":
                break
            await asyncio.sleep(0.2)
            body = (await ready(served))[1]
        assert body["checks"]["gateway"].startswith("the heartbeat is older than")
    finally:
        for pid in stuck:
            os.kill(pid, signal.SIGCONT)
    await until(served, 200)


async def test_one_stuck_worker_makes_the_gateway_not_ready(
    tmp_path: Path, sink: SinkHandle
) -> None:
    """With several worker processes, each must beat: one stopped worker (not the
    first, whose heartbeat is the gateway's) is named, the others keep serving."""
    served = serve(tmp_path, sink.port, gateway={"workers": 2})
    try:
        await until(served, 200)
        second = worker_pids(served.process.pid)[1]
        os.kill(second, signal.SIGSTOP)
        try:
            body = await until(served, 503, timeout=25)
            assert body["checks"]["workers"] == "no recent heartbeat from worker 1 of 2"
            assert body["checks"]["gateway"] == "ok"
        finally:
            os.kill(second, signal.SIGCONT)
        await until(served, 200)
    finally:
        served.stop()


async def test_a_stopped_gateway_is_not_ready_at_once(tmp_path: Path, served: Served) -> None:
    await until(served, 200)
    served.stop()
    assert not (served.data_dir / "health.json").exists()
