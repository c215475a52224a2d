"""Queue tools, connector verify, expiry and delay warnings, against real sinks."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import yaml

from smtpgate.sink import parse_reply
from tests.conftest import (
    SMTPGATE,
    Certs,
    GatewayFactory,
    SinkHandle,
    base_config,
    free_port,
    run_tool,
)
from tests.integration.test_auth_live import PASSWORD, auth_config


def _send(port: int, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("bob@example.org", [to], b"Subject: q\r\n\r\nqueued\r\n")


def _split_config(sink_port: int, dead_port: int, **queue: Any) -> dict[str, Any]:
    """example.com goes to a dead smarthost, example.org (the sender's) to the sink."""
    return {
        "spoof_detection": False,
        "queue": {"retry": {"first": 3600, "max_backoff": 3600}, **queue},
        "send_connectors": [
            {
                "name": "dead",
                "security": "none",
                "namespaces": [{"recipient": "example.com"}],
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": dead_port}},
            },
            {
                "name": "sink",
                "security": "none",
                "namespaces": [{"recipient": "example.org"}],
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink_port}},
            },
        ],
    }


async def _cli(config: Path, *argv: str) -> tuple[int, str]:
    return await run_tool(SMTPGATE, "queue", *argv, "--config", str(config))


async def test_queue_list_show_hold_release_delete_bounce(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    overrides = _split_config(sink.port, free_port())
    gw = await gateway_factory(**overrides)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({**base_config(tmp_path / "gw0", sink.port), **overrides}))
    for to in ("alice@example.com", "carol@example.com"):
        await asyncio.to_thread(_send, gw.port, to)
    await asyncio.sleep(1)  # the first attempts fail and defer

    code, out = await _cli(path, "list", "--json")
    messages = json.loads(out)
    assert code == 0
    assert [m["recipients"][0]["state"] for m in messages] == ["deferred", "deferred"]
    assert "unreachable" in messages[0]["recipients"][0]["last_reply"]
    first, second = messages[0]["id"], messages[1]["id"]
    assert (
        json.loads((await _cli(path, "list", "--recipient", "carol@example.com", "--json"))[1])[0][
            "id"
        ]
        == second
    )
    assert json.loads((await _cli(path, "list", "--older-than", "1h", "--json"))[1]) == []
    assert "-- 2 message(s)" in (await _cli(path, "list", "--domain", "example.com"))[1]

    assert (await _cli(path, "hold", first))[0] == 0
    assert json.loads((await _cli(path, "show", first))[1])["recipients"][0]["state"] == "held"
    assert len(json.loads((await _cli(path, "list", "--state", "held", "--json"))[1])) == 1
    assert (await _cli(path, "release", first))[0] == 0
    assert json.loads((await _cli(path, "show", first))[1])["recipients"][0]["state"] in (
        "queued",
        "deferred",
    )
    assert (await _cli(path, "delete", second))[1].strip() == f"{second}: deleted"
    assert (await _cli(path, "show", second))[0] == 1

    assert (await _cli(path, "bounce", first))[0] == 0
    [(meta, body)] = await sink.wait_for(1)
    assert meta["recipients"] == ["bob@example.org"]
    assert b"5.0.0 bounced by the administrator" in body
    await asyncio.sleep(0.5)
    assert json.loads((await _cli(path, "list", "--json"))[1]) == []


async def test_queue_retry_now(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    overrides = {"spoof_detection": False, "queue": {"retry": {"first": 3600, "max_backoff": 3600}}}
    gw = await gateway_factory(**overrides)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({**base_config(tmp_path / "gw0", sink.port), **overrides}))
    sink.behaviour.data_replies.append(parse_reply("451 4.3.0 try later"))
    await asyncio.to_thread(_send, gw.port, "alice@example.com")
    await asyncio.sleep(1)
    assert sink.messages() == []  # deferred for an hour
    code, out = await _cli(path, "retry", "--all")
    assert code == 0
    assert "1 recipient(s) now queued" in out
    assert len(await sink.wait_for(1)) == 1


async def test_delay_warning_then_expiry_bounce(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    overrides = _split_config(sink.port, free_port(), delay_warning=0.5)
    overrides["queue"]["retry"] = {"first": 0.3, "max_backoff": 0.5, "lifetime": 2.5}
    gw = await gateway_factory(**overrides)
    await asyncio.to_thread(_send, gw.port, "alice@example.com")
    reports = await sink.wait_for(2, timeout=15)
    texts = [body.decode() for _, body in reports]
    assert "Action: delayed" in texts[0]
    assert "Will-Retry-Until:" in texts[0]
    assert "Action: failed" in texts[1]
    assert "Status: 4.4.7" in texts[1]
    await asyncio.sleep(1)
    assert len(sink.messages()) == 2  # one warning only


def _verify(path: Path, name: str) -> tuple[int, str]:
    result = subprocess.run(
        [SMTPGATE, "connector", "verify", name, "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return result.returncode, result.stdout + result.stderr


async def test_connector_verify_reports_each_step(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path, certs: Certs
) -> None:
    # A gateway with STARTTLS and AUTH plays the smarthost to verify against.
    config = auth_config(tmp_path, certs)
    config["send_connectors"][0]["deliver"]["smarthost"]["port"] = sink.port
    smarthost = await gateway_factory(**config)
    secret = tmp_path / "smarthost.pw"
    secret.write_text(PASSWORD)
    secret.chmod(0o600)
    right = {
        "host": "127.0.0.1",
        "port": smarthost.port,
        "username": "alice",
        "password_file": str(secret),
    }
    document = base_config(tmp_path / "verifier", sink.port)
    document["send_connectors"] = [
        {"name": "good", "security": "require-starttls", "deliver": {"smarthost": right}},
        {
            "name": "bad-password",
            "security": "require-starttls",
            "deliver": {"smarthost": {**right, "password_file": str(tmp_path / "wrong.pw")}},
        },
        {
            "name": "down",
            "security": "starttls",
            "deliver": {"smarthost": {"host": "127.0.0.1", "port": free_port()}},
        },
    ]
    (tmp_path / "wrong.pw").write_text("nope")
    (tmp_path / "wrong.pw").chmod(0o600)
    path = tmp_path / "verify.yaml"
    path.write_text(yaml.safe_dump(document))
    code, out = await asyncio.to_thread(_verify, path, "good")
    assert code == 0, out
    for step in (
        "ok   connect",
        "ok   greeting",
        "ok   EHLO",
        "ok   STARTTLS: TLSv1.",
        "ok   AUTH: as alice: 235 2.7.0",
    ):
        assert step in out
    code, out = await asyncio.to_thread(_verify, path, "bad-password")
    assert code == 1
    assert "FAIL AUTH: as alice: 535 5.7.8" in out
    assert PASSWORD not in out
    code, out = await asyncio.to_thread(_verify, path, "down")
    assert code == 1
    assert "FAIL connect" in out
