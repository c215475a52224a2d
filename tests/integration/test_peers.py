"""Peer gateways, end to end: two or three real `smtpgate serve` processes on
loopback sharing one configuration store (a private PostgreSQL), each with its
own file, data directory, SMTP port and node name (``tests/peers.py``). What a
user notices: SMTP replies, what reaches the sink, what the CLI prints and
its exit code."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from smtpgate.admin import nodes
from smtpgate.cli.cluster import status_text
from smtpgate.config.secret import fingerprint
from smtpgate.config.store import ConfigStore
from tests import postgres as private_postgres
from tests.conftest import SMTPGATE, Certs, SinkHandle, start_sink
from tests.peers import Cluster, Node, pg_start, pg_stop
from tests.postgres import Postgres

postgres = private_postgres.postgres  # the fixtures
postgres_url = private_postgres.postgres_url

SHARED = {
    "spoof_detection": False,
    "connection_profiles": [{"name": "apps", "client_hosts": ["127.0.0.2"], "relay": "full"}],
}


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str, sink: SinkHandle) -> Iterator[Cluster]:
    peers = Cluster(tmp_path / "cluster", postgres_url, sink.port, SHARED)
    try:
        yield peers
    finally:
        peers.close()


def two(cluster: Cluster) -> tuple[Node, Node]:
    """gw1 first (it seeds the store), then gw2 joining it."""
    a, b = cluster.node("gw1"), cluster.node("gw2")
    cluster.start(a)
    cluster.start(b)
    return a, b


def send(port: int, text: str, source: str = "127.0.0.1") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        client.sendmail(
            "bob@example.org", ["alice@example.com"], f"Subject: {text}\r\n\r\n{text}\r\n"
        )


def greeting(port: int, source: str = "127.0.0.2") -> int:
    """The greeting's code for a client from ``source`` (127.0.0.2: the apps profile)."""
    client = smtplib.SMTP(timeout=10)
    try:
        code, _ = client.connect("127.0.0.1", port, source_address=(source, 0))
    except smtplib.SMTPConnectError as refused:
        return refused.smtp_code
    finally:
        client.close()
    return code


def subjects(sink: SinkHandle) -> set[str]:
    found = set()
    for _envelope, body in sink.messages():
        for line in body.decode().splitlines():
            if line.startswith("Subject: "):
                found.add(line.removeprefix("Subject: "))
    return found


async def arrived(sink: SinkHandle, *texts: str, timeout: float = 20) -> set[str]:
    """The subjects at the sink once all of ``texts`` are there (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while not set(texts) <= subjects(sink) and time.monotonic() < deadline:  # noqa: ASYNC110 - files written by the sink
        await asyncio.sleep(0.05)
    return subjects(sink)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def one_clear_line(done: subprocess.CompletedProcess[str]) -> str:
    """A failed command: exit 1, one line on stderr, no traceback."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def status(node: Node) -> dict[str, dict[str, object]]:
    found = json.loads(ok(node.cli("cluster", "status", "--json")))
    return {n["node"]: n for n in found["nodes"]}


def test_an_apply_on_one_node_is_enforced_on_its_peer_before_it_returns(
    cluster: Cluster,
) -> None:
    a, b = two(cluster)
    assert greeting(a.port) == greeting(b.port) == 220
    ok(a.cli("profile", "set", "apps", "relay=blocked"))
    out = ok(a.cli("config", "apply"))
    assert greeting(b.port) == 554  # at once, the peer refuses the blocked client
    assert greeting(a.port) == 554
    assert "gw1: applied (running revision 2)" in out
    assert "gw2: applied (running revision 2)" in out


def test_a_stopped_peer_is_down_for_applies_and_runs_the_latest_when_restarted(
    cluster: Cluster,
) -> None:
    """A peer stopped with SIGTERM says so: applies made meanwhile report it down
    at once (they do not wait for it, and a down node does not fail them); once
    restarted, it runs the latest revision, whatever its file says."""
    a, b = two(cluster)
    assert b.stop() == 0
    assert status(a)["gw2"]["state"] == "down"
    ok(a.cli("profile", "set", "apps", "relay=blocked"))
    started = time.monotonic()
    first = ok(a.cli("config", "apply"))
    ok(a.cli("profile", "add", "others", "client_hosts=[127.0.0.3]", "relay=blocked"))
    second = ok(a.cli("config", "apply"))
    assert time.monotonic() - started < 5  # not the 6 s until a silent node counts as down
    for out, revision in ((first, 2), (second, 3)):
        assert f"gw1: applied (running revision {revision})" in out
        assert re.search(r"^gw2: down \(stopped \d+ s ago\)$", out, re.MULTILINE), out
    text = ok(a.cli("cluster", "status"))
    assert re.search(r"^gw2: down \(stopped [\d.]+ s ago\), revision 1, 2 behind", text, re.M)

    cluster.start(b)
    assert "running revision 3 from the store" in b.log()
    found = status(a)["gw2"]
    assert (found["state"], found["running_revision"], found["lag"]) == ("up", 3, 0)
    assert greeting(b.port) == 554  # revision 2: apps blocked
    assert greeting(b.port, "127.0.0.3") == 554  # revision 3: others blocked
    assert greeting(b.port, "127.0.0.4") == 220


async def test_with_the_store_down_peers_relay_and_edits_fail_then_applies_reach_both(
    cluster: Cluster, sink: SinkHandle, postgres: Postgres
) -> None:
    a, b = two(cluster)
    pg_stop(postgres)
    try:
        send(a.port, "via gw1 while the store is down")
        send(b.port, "via gw2 while the store is down")
        assert {"via gw1 while the store is down", "via gw2 while the store is down"} <= (
            await arrived(
                sink, "via gw1 while the store is down", "via gw2 while the store is down"
            )
        )
        down = one_clear_line(a.cli("cluster", "status"))
        assert down.startswith("smtpgate: configuration store unreachable: ")
        edit = one_clear_line(a.cli("profile", "set", "apps", "relay=blocked"))
        assert edit.startswith("smtpgate: configuration store unreachable: ")
        assert greeting(a.port) == greeting(b.port) == 220  # still the revision they ran
    finally:
        pg_start(postgres)
    ok(a.cli("profile", "set", "apps", "relay=blocked"))
    out = ok(a.cli("config", "apply"))
    assert "gw1: applied (running revision 2)" in out
    assert "gw2: applied (running revision 2)" in out
    assert greeting(a.port) == greeting(b.port) == 554
    for node in (a, b):  # each noticed the outage (and followed the store again: above)
        assert "not listening for applied revisions" in node.log()


async def test_a_peer_that_cannot_load_a_new_certificate_keeps_its_revision_and_apply_says_so(
    cluster: Cluster, sink: SinkHandle, certs: Certs
) -> None:
    """The revision names a certificate by a relative path: gw1's host has the
    files, gw2's has not. gw2 refuses the revision, keeps serving the one it
    ran, and the apply on gw1 names gw2's failure and its reason."""
    a, b = two(cluster)
    (a.directory / "certs").mkdir()
    shutil.copy(certs.cert_file, a.directory / "certs" / "partner.pem")
    shutil.copy(certs.key_file, a.directory / "certs" / "partner.key")
    (a.directory / "certs" / "partner.key").chmod(0o600)
    ok(a.cli("certificate", "add", "partner", "cert=certs/partner.pem", "key=certs/partner.key"))
    ok(a.cli("profile", "set", "apps", "relay=blocked"))
    done = a.cli("config", "apply")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gw1: applied (running revision 2)" in done.stdout
    [failed] = [line for line in done.stdout.splitlines() if line.startswith("gw2: ")]
    assert failed.startswith("gw2: failed (")
    assert "certificate 'partner': cannot load certs/partner.pem" in failed, failed

    assert greeting(a.port) == 554
    assert greeting(b.port) == 220  # gw2 still runs revision 1: apps may relay
    send(b.port, "via gw2 on its old revision")
    assert "via gw2 on its old revision" in await arrived(sink, "via gw2 on its old revision")
    found = status(a)["gw2"]
    assert (found["state"], found["running_revision"], found["lag"]) == ("up", 1, 1)
    assert found["refused_revision"] == 2
    assert "certs/partner.pem" in str(found["error"])
    text = ok(a.cli("cluster", "status"))
    assert re.search(r"^gw2: up .*revision 1, 1 behind.*; error: .*partner\.pem", text, re.M), text


def test_a_draft_staged_on_an_older_revision_is_refused_on_the_other_node(
    cluster: Cluster,
) -> None:
    """One draft for the cluster, staged on gw2 on revision 1; meanwhile gw1's
    file changed and its restart applied it as revision 2. Applying the draft
    on gw2 would undo that: refused, with the reason."""
    a, b = two(cluster)
    ok(b.cli("profile", "set", "apps", "relay=blocked"))
    assert a.stop() == 0
    a.document["hosted_domains"] = [*a.document["hosted_domains"], "example.net"]
    a.write()
    cluster.start(a)
    assert "the configuration file is new or changed" in a.log()
    assert "a draft based on revision 1 is still staged: running revision 2" in a.log()
    line = one_clear_line(b.cli("config", "apply"))
    assert line.startswith(
        "smtpgate: the draft was staged on revision 1, but revision 2 has been applied since; "
        "applying would undo its changes."
    ), line
    assert greeting(b.port) == greeting(a.port) == 220  # the draft is not in force
    assert status(b)["gw2"]["running_revision"] == 2  # what gw1 applied is


async def test_send_connectors_by_role_route_each_nodes_mail_to_its_own_next_hop(
    tmp_path: Path, postgres_url: str, sink: SinkHandle
) -> None:
    edge_sink = await start_sink(tmp_path / "edge-sink")
    connectors = [
        {
            "name": name,
            "roles": [role],
            "deliver": {"smarthost": {"host": "127.0.0.1", "port": port}},
            "security": "none",
        }
        for name, role, port in (
            ("inside", "internal", sink.port),
            ("outside", "edge", edge_sink.port),
        )
    ]
    peers = Cluster(
        tmp_path / "cluster", postgres_url, sink.port, SHARED | {"send_connectors": connectors}
    )
    try:
        a = peers.node("gw1", gateway={"roles": ["internal"]})
        b = peers.node("gw2", gateway={"roles": ["edge"]})
        peers.start(a)
        peers.start(b)
        send(a.port, "through the internal node")
        send(b.port, "through the edge node")
        assert "through the internal node" in await arrived(sink, "through the internal node")
        assert "through the edge node" in await arrived(edge_sink, "through the edge node")
        assert subjects(sink) == {"through the internal node"}
        assert subjects(edge_sink) == {"through the edge node"}
    finally:
        peers.close()
        await edge_sink.server.stop(1)


def test_a_node_with_another_secret_key_refuses_to_start(cluster: Cluster) -> None:
    a = cluster.node("gw1")
    cluster.start(a)  # records the cluster key's fingerprint
    other = cluster.root / "other.key"
    other.write_bytes(Fernet.generate_key() + b"\n")
    other.chmod(0o600)
    c = cluster.node("gw3", key=other)
    done = subprocess.run(
        [SMTPGATE, "serve", "--config", str(c.config_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=c.directory,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    mine, theirs = (fingerprint(k.read_bytes().strip()) for k in (other, cluster.key_file))
    assert f"fingerprint {mine}) is not the cluster's (fingerprint {theirs})" in done.stderr
    with cluster.store() as store:
        assert "gw3" not in nodes.reports(store)
    assert set(status(a)) == {"gw1"}


def test_a_report_saying_stopped_is_down_at_once(tmp_path: Path) -> None:
    """What a peer's last report (SIGTERM) means to apply, status and forget."""
    store = ConfigStore.open(tmp_path)
    try:
        now = 5000.0
        nodes.publish(store, "gw2", {"running_revision": 1, "stopped": True}, now - 1)
        report = nodes.reports(store)["gw2"]
        assert nodes.outcome("gw2", report, 2, now) == nodes.NodeOutcome(
            "gw2", "down", "stopped 1 s ago"
        )
        [found] = nodes.cluster(store, now)["nodes"]
        assert (found["state"], found["stopped"]) == ("down", True)
        assert (
            status_text(nodes.cluster(store, now))
            .splitlines()[1]
            .startswith("gw2: down (stopped 1 s ago), revision 1")
        )
        nodes.forget(store, "gw2", now)  # no --force needed: it is not up
        assert nodes.reports(store) == {}
    finally:
        store.close()
