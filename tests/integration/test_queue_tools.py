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
from tests.clock import (
    FakeClock,
    advance,
    attempts_are,
    empty,
    states_are,
    use_clock,
    wait_queue,
)
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
    await wait_queue(gw.gateway, states_are("deferred", "deferred"))  # the first attempts fail

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
    await wait_queue(gw.gateway, empty)
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
    await wait_queue(gw.gateway, states_are("deferred"))
    assert sink.messages() == []  # deferred for an hour
    code, out = await _cli(path, "retry", "--all")
    assert code == 0
    assert "1 recipient(s) now queued" in out
    assert len(await sink.wait_for(1)) == 1


async def test_delay_warning_then_expiry_bounce(
    gateway_factory: GatewayFactory, sink: SinkHandle
) -> None:
    overrides = _split_config(sink.port, free_port(), delay_warning=600)
    overrides["queue"]["retry"] = {"first": 60, "max_backoff": 300, "lifetime": 3600}
    gw = await gateway_factory(**overrides)
    clock = FakeClock()
    use_clock(gw.gateway, clock)
    await asyncio.to_thread(_send, gw.port, "alice@example.com")
    await wait_queue(gw.gateway, attempts_are(("deferred", 1)))  # at 0 s; again at 60 s
    advance(gw.gateway, clock, 599)
    await wait_queue(gw.gateway, attempts_are(("deferred", 2)))  # at 599 s; again at 719 s
    assert sink.messages() == []  # not late enough for a warning
    advance(gw.gateway, clock, 121)  # at 720 s: past delay_warning
    [(meta, warning)] = await sink.wait_for(1)
    assert meta["recipients"] == ["bob@example.org"]
    text = warning.decode()
    assert "Action: delayed" in text
    assert "Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000" in text
    assert "Last-Attempt-Date: Tue, 14 Nov 2023 22:25:20 +0000" in text
    assert "Will-Retry-Until: Tue, 14 Nov 2023 23:13:20 +0000" in text  # arrival + lifetime
    await wait_queue(gw.gateway, attempts_are(("deferred", 3)))  # the warning is delivered
    advance(gw.gateway, clock, 240)  # at 960 s: deferred again, no second warning
    await wait_queue(gw.gateway, attempts_are(("deferred", 4)))
    advance(gw.gateway, clock, 3000)  # at 3960 s: past the lifetime
    [_, (_, failed)] = await sink.wait_for(2)
    assert "Action: failed" in failed.decode()
    assert "Status: 4.4.7" in failed.decode()
    await wait_queue(gw.gateway, empty)  # nothing left: no report still to come
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
