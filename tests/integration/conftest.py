"""Fixtures for the integration tests of the REST API: a real ``smtpgate
serve`` process with its API on a free loopback port, and a token for it."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SMTPGATE, GatewayProcess, SinkHandle, free_port

PROFILE = {"name": "partner", "client_hosts": ["127.0.0.2"], "relay": "full"}


@dataclass
class Api:
    url: str
    token: str
    gateway: GatewayProcess
    client: httpx.AsyncClient

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.request(method, path, **kwargs)

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.call(method, path, **kwargs)
        assert response.status_code < 300, response.text
        return response.json()

    async def wait_running(self, revision: int, timeout: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status: dict[str, Any] = await self.ok("GET", "/status")
            if status["running_revision"] == revision or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.1)


def make_token(config: Path, name: str = "tests") -> str:
    done = subprocess.run(
        [SMTPGATE, "admin", "token", "create", name, "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
async def api(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> AsyncIterator[Api]:
    port = free_port()
    gateway = gateway_process(
        sink.port,
        admin={"listen": f"127.0.0.1:{port}"},
        connection_profiles=[PROFILE],
        send_connectors=[
            {
                "name": "to-sink",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
                "security": "none",
            }
        ],
    )
    token = await asyncio.to_thread(make_token, gateway.config_path)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url + "/api/v1", headers=headers) as client:
        handle = Api(url, token, gateway, client)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                await client.get("/status")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        yield handle
