"""Postfix habits: ``queue show --body`` (postcat -q), bulk queue actions by
filter with a count and ``--yes``, the default configuration path, a missing
``--data-dir``, and output cut short by ``head``."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
from pathlib import Path

import yaml

from tests.clock import states_are, wait_queue
from tests.conftest import (
    SMTPGATE,
    GatewayFactory,
    SinkHandle,
    base_config,
    free_port,
    run_tool,
)

BODY = b"Subject: habits\r\nX-Marker: kept as stored\r\n\r\nline one\r\nline two\r\n"


def _send(port: int, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("bob@example.org", [to], BODY)


def _overrides(dead_port: int) -> dict[str, object]:
    """example.com and example.net go to a dead smarthost: they stay deferred."""
    return {
        "spoof_detection": False,
        "hosted_domains": ["example.com", "example.net", "example.org"],
        "queue": {"retry": {"first": 3600, "max_backoff": 3600}},
        "send_connectors": [
            {
                "name": "dead",
                "security": "none",
                "namespaces": [{"recipient": "example.com"}, {"recipient": "example.net"}],
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": dead_port}},
            },
        ],
    }


async def _queue(config: Path, *argv: str) -> tuple[int, str]:
    return await run_tool(SMTPGATE, "queue", *argv, "--config", str(config))


async def test_show_body_and_bulk_delete_by_domain(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    overrides = _overrides(free_port())
    gw = await gateway_factory(**overrides)
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({**base_config(tmp_path / "gw0", sink.port), **overrides}))
    for to in ("a@example.com", "b@example.com", "c@example.net"):
        await asyncio.to_thread(_send, gw.port, to)
    await wait_queue(gw.gateway, states_are("deferred", "deferred", "deferred"))
    listed = json.loads((await _queue(config, "list", "--json"))[1])
    ids = {m["recipients"][0]["address"]: m["id"] for m in listed}

    code, out = await _queue(config, "show", ids["c@example.net"], "--body")
    assert code == 0
    envelope, _, rest = out.partition("*** MESSAGE CONTENTS ***\n")
    assert f"queue_id: {ids['c@example.net']}" in envelope
    assert "sender: <bob@example.org>" in envelope
    assert "recipient: <c@example.net> [deferred]" in envelope
    stored = rest.removesuffix("*** END OF MESSAGE ***\n")
    assert "X-Marker: kept as stored\r\n" in stored  # as stored: CRLF, our trace header first
    assert stored.endswith("line one\r\nline two\r\n")

    # without --yes: the count and what would happen, exit 1, nothing done
    code, out = await _queue(config, "delete", "--state", "deferred", "--domain", "example.com")
    assert code == 1
    assert out.splitlines()[0] == "2 message(s) match"
    assert f"would delete {ids['a@example.com']}" in out
    assert "add --yes" in out
    assert len(json.loads((await _queue(config, "list", "--json"))[1])) == 3

    code, out = await _queue(
        config, "delete", "--state", "deferred", "--domain", "example.com", "--yes"
    )
    assert code == 0, out
    assert out.splitlines()[0] == "2 message(s) match"
    assert f"{ids['b@example.com']}: delete done, now deleted" in out
    left = json.loads((await _queue(config, "list", "--json"))[1])
    assert [m["id"] for m in left] == [ids["c@example.net"]]

    code, out = await _queue(config, "hold", "--domain", "example.net", "--yes")
    assert code == 0
    assert "now held (1 recipients)" in out
    assert (await _queue(config, "list", "--state", "held", "--json"))[1].count('"id"') == 1
    code, out = await _queue(config, "release", "--state", "held", "--domain", "example.net")
    assert (code, out.splitlines()[0]) == (1, "1 message(s) match")
    # nothing matched: nothing to confirm
    code, out = await _queue(config, "bounce", "--domain", "nowhere.example")
    assert (code, out.strip()) == (0, "0 message(s) match")
    # neither an ID nor a filter; both
    code, out = await _queue(config, "delete")
    assert code == 2
    assert "give a queue ID, or filters" in out
    code, out = await _queue(config, "hold", ids["c@example.net"], "--domain", "example.net")
    assert code == 2
    assert "not both" in out

    # a reader that leaves early: quiet, exit 141 on the writer's side
    listing = await asyncio.to_thread(
        subprocess.run,
        f"{SMTPGATE} queue show {ids['c@example.net']} --body --config {config} | head -c 10; "
        f"exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        check=False,
    )
    assert listing.stdout == b"*** ENVELO"
    assert listing.stderr == b""
    assert listing.returncode in (0, 141)  # 0: it all fitted in the pipe first


def test_default_configuration_path(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.yaml"
    config.write_text(yaml.safe_dump(base_config(tmp_path / "data", free_port())))
    with_variable = {**os.environ, "SMTPGATE_CONFIG": str(config)}
    done = subprocess.run(
        [SMTPGATE, "config", "check"],
        env=with_variable,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"{config}: configuration is valid")

    missing = {**os.environ, "SMTPGATE_CONFIG": str(tmp_path / "nope.yaml")}
    for argv in (["config", "check"], ["queue", "list"], ["serve"], ["certs", "list"]):
        done = subprocess.run(
            [SMTPGATE, *argv], env=missing, capture_output=True, text=True, check=False
        )
        assert done.returncode == 1, argv
        [line] = done.stderr.splitlines()  # one line, naming the file and the defaults
        assert str(tmp_path / "nope.yaml") in line
        assert "$SMTPGATE_CONFIG" in line
        assert "/etc/smtpgate/gateway.yaml" in line
    without = {k: v for k, v in os.environ.items() if k != "SMTPGATE_CONFIG"}
    if not Path("/etc/smtpgate/gateway.yaml").exists():
        done = subprocess.run(
            [SMTPGATE, "queue", "list"], env=without, capture_output=True, text=True, check=False
        )
        assert done.returncode == 1
        assert "/etc/smtpgate/gateway.yaml does not exist" in done.stderr


def test_missing_data_dir_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    for argv in (["queue", "list"], ["config", "history"], ["admin", "token", "list"]):
        done = subprocess.run(
            [SMTPGATE, *argv, "--data-dir", str(missing)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 2, argv
        assert f"no such directory: {missing}" in done.stderr
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [SMTPGATE, "queue", "list", "--data-dir", str(empty)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "is not a gateway data directory" in done.stderr
    assert list(empty.iterdir()) == []
    (empty / "queue").mkdir()  # a queue and no store: the store is not made up
    for argv in (["config", "history"], ["admin", "token", "list"], ["cluster", "status"]):
        done = subprocess.run(
            [SMTPGATE, *argv, "--data-dir", str(empty)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 1, argv
        assert "has no configuration store" in done.stderr
    assert sorted(p.name for p in empty.iterdir()) == ["queue"]
