"""The REST API over HTTP (httpx) against a real ``smtpgate serve`` process,
the CLI against that API, and schemathesis against the published OpenAPI spec.

The gateway relays to a real sink, so "apply" is checked by what clients and
the sink see, not by reading the gateway's memory.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import SMTPGATE, GatewayProcess, SinkHandle, base_config, free_port, run_tool
from tests.dnsserver import start_dns
from tests.integration.conftest import PROFILE, Api, make_token


def _send(port: int, source: str, to: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as smtp:
        refused = smtp.sendmail("app@apps.test", [to], b"Subject: t\r\n\r\nhello\r\n")
        assert not refused
        return "ok"


async def test_every_operation_needs_a_valid_token(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        for documentation in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
            response = await anonymous.get(documentation)
            assert response.status_code == 401, documentation  # 200 to anyone, before
    spec = (await api.client.get(api.url + "/openapi.json")).json()
    operations = [
        (method, path)
        for path, item in spec["paths"].items()
        for method in item
        if method != "parameters"
    ]
    assert len(operations) > 50
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        for method, path in operations:
            concrete = path.replace("{", "").replace("}", "")
            for headers in ({}, {"Authorization": "Bearer sgt_wrong"}):
                response = await anonymous.request(method, concrete, headers=headers)
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_status_reports_node_revision_listeners_and_queue(api: Api) -> None:
    status = await api.ok("GET", "/status")
    assert status["node"] == "gw1"
    assert status["running_revision"] == status["applied_revision"] == 1
    assert status["listeners"][0]["address"] == f"127.0.0.1:{api.gateway.port}"
    assert status["restart_required"] == []
    assert isinstance(status["queue"], dict)
    cluster = await api.ok("GET", "/cluster")
    assert cluster["applied_revision"] == 1
    assert [(n["node"], n["state"], n["running_revision"]) for n in cluster["nodes"]] == [
        ("gw1", "up", 1)
    ]
    assert (await api.call("DELETE", "/cluster/gw9")).status_code == 404
    assert (await api.call("DELETE", "/cluster/gw1")).status_code == 409  # up: needs force


async def test_profile_change_applied_over_http_reaches_new_connections(
    api: Api, sink: SinkHandle
) -> None:
    port = api.gateway.port
    await asyncio.to_thread(_send, port, "127.0.0.2", "someone@elsewhere.test")
    assert len(await sink.wait_for(1)) == 1

    # stage: the partner may no longer relay; nothing changes until apply
    changed = {**PROFILE, "relay": "restricted-internal", "notes": "no relay any more"}
    await api.ok("PUT", "/config/draft/connection_profiles/partner", json=changed)
    diff = await api.ok("GET", "/config/diff")
    texts = [c["text"] for c in diff["changes"]]
    assert "connection profile partner: relay full → restricted-internal" in texts
    assert diff["restart_required"] == []
    await asyncio.to_thread(_send, port, "127.0.0.2", "other@elsewhere.test")
    assert len(await sink.wait_for(2)) == 2

    result = await api.ok("POST", "/config/apply", json={"comment": "stop partner relay"})
    assert result["revision"] == 2
    # the answer comes once the gateway enforces it: no need to poll /status
    assert result["complete"] is True
    assert result["nodes"] == [{"node": "gw1", "state": "applied", "detail": "running revision 2"}]
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(_send, port, "127.0.0.2", "third@elsewhere.test")

    history = await api.ok("GET", "/config/history")
    assert [(h["revision"], h["applied_by"], h["comment"]) for h in history[:1]] == [
        (2, "token:tests", "stop partner relay")
    ]
    audit = await api.ok("GET", "/audit")
    assert {"token:tests"} <= {e["actor"] for e in audit}

    # roll back to revision 1 and the partner relays again
    await api.ok("POST", "/config/rollback", json={"revision": 1})
    await api.ok("POST", "/config/apply", json={"comment": "undo"})
    await api.wait_running(3)
    await asyncio.to_thread(_send, port, "127.0.0.2", "fourth@elsewhere.test")
    assert len(await sink.wait_for(3)) == 3


async def test_sub_resources_edit_the_draft(api: Api) -> None:
    base = "/config/draft/connection_profiles/partner"
    hosts = await api.ok("POST", base + "/client_hosts", json={"value": "10.9.0.0/16"})
    assert hosts == ["127.0.0.2", "10.9.0.0/16"]
    hosts = await api.ok("DELETE", base + "/client_hosts/10.9.0.0/16")
    assert hosts == ["127.0.0.2"]
    domains = await api.ok("POST", "/config/draft/hosted_domains", json={"value": "Example.NET"})
    assert "example.net" in domains
    namespaces = [{"sender": "*", "recipient": "*.example.net"}]
    got = await api.ok("PUT", "/config/draft/send_connectors/to-sink/namespaces", json=namespaces)
    assert got == namespaces
    spoof = await api.ok("PUT", "/config/draft/spoof_detection", json={"value": False})
    assert spoof == {"value": False}
    tls = await api.ok("GET", "/config/draft/tls")
    tls["opportunistic"] = False
    await api.ok("PUT", "/config/draft/tls", json=tls)
    # listeners are node-local: they are read here, but changed in the node's file
    listener = await api.ok("GET", "/config/draft/listeners/mx")
    moved = await api.call(
        "PUT", "/config/draft/listeners/mx", json={**listener, "address": "127.0.0.1:1"}
    )
    assert moved.status_code == 422
    assert "node-local" in moved.json()["problems"][0]["message"]
    limits = await api.ok("GET", "/config/draft/limits")
    await api.ok("PUT", "/config/draft/limits", json={**limits, "max_connections": 99})
    created = await api.call(
        "POST",
        "/config/draft/send_connectors",
        json={"name": "backup", "deliver": {"dns": {}}, "cost": 20},
    )
    assert created.status_code == 201
    diff = await api.ok("GET", "/config/diff")
    assert diff["restart_required"] == ["limits.max_connections"]
    texts = "\n".join(c["text"] for c in diff["changes"])
    assert "hosted domains: added example.net" in texts
    assert "send connector backup: added" in texts
    assert "spoof detection true → false" in texts
    result = await api.ok("POST", "/config/apply", json={})
    assert result["restart_required"] == ["limits.max_connections"]
    status = await api.wait_running(2)
    assert status["restart_required"] == ["limits.max_connections"]
    assert status["listeners"][0]["address"] == f"127.0.0.1:{api.gateway.port}"
    await asyncio.to_thread(_send, api.gateway.port, "127.0.0.2", "x@example.com")


BAD_INPUT = [
    # (method, path, body, status, a field path the reply must name)
    (
        "POST",
        "/config/draft/connection_profiles",
        {"name": "x", "relay": "maybe"},
        422,
        "relay",
    ),
    (
        "POST",
        "/config/draft/connection_profiles",
        {"name": "x", "client_hosts": ["127.0.0.2"]},
        422,
        "connection_profiles[1].client_hosts[0]",
    ),
    ("POST", "/config/draft/connection_profiles", {**PROFILE}, 409, None),
    ("PUT", "/config/draft/connection_profiles/nobody", {**PROFILE}, 404, None),
    ("DELETE", "/config/draft/connection_profiles/nobody", None, 404, None),
    (
        "POST",
        "/config/draft/connection_profiles/partner/client_hosts",
        {"value": "10.0.0.1/8"},
        422,
        "connection_profiles[0].client_hosts[1]",
    ),
    (
        "POST",
        "/config/draft/connection_profiles/partner/sender_domains",
        {"value": "bad..x"},
        422,
        "sender_domains",
    ),
    ("POST", "/config/draft/send_connectors", {"name": "x", "deliver": {}}, 422, "deliver"),
    (
        "PUT",
        "/config/draft/send_connectors/to-sink/namespaces",
        [{"sender": 5}],
        422,
        "[0].sender",
    ),
    ("POST", "/config/draft/certificates", {"name": "c"}, 422, "body"),
    (
        "POST",
        "/config/draft/certificates",
        {"name": "c", "cert": "/nonexistent.pem"},
        201,  # staged: the file is only opened by validate and apply
        None,
    ),
    ("POST", "/config/draft/listeners", {"name": "l", "address": "nowhere"}, 422, "address"),
    ("DELETE", "/config/draft/listeners/mx", None, 422, "listeners"),
    ("POST", "/config/draft/hosted_domains", {"value": "-bad-.."}, 422, "hosted_domains[2]"),
    ("DELETE", "/config/draft/hosted_domains/nothere.test", None, 404, None),
    ("PUT", "/config/draft/limits", {"max_recipients": -1}, 422, "max_recipients"),
    ("PUT", "/config/draft/timeouts", {"command": "soon"}, 422, "command"),
    ("PUT", "/config/draft/gateway", {"data_dir": "/elsewhere"}, 422, "gateway.data_dir"),
    ("PUT", "/config/draft/tls", {"protocols": ["TLSv1", "TLSv1.3"]}, 422, "protocols"),
    ("PUT", "/config/draft/default_profile", {"relay": "yes"}, 422, "relay"),
    ("PUT", "/config/draft/spam", {"check_outbound": "often"}, 422, "check_outbound"),
    ("PUT", "/config/draft/queue", {"retry": {"first": -5}}, 422, "retry.first"),
    ("PUT", "/config/draft/admin", {"listen": "everywhere"}, 422, "listen"),
    ("PUT", "/config/draft/spoof_detection", {"value": "perhaps"}, 422, "value"),
    ("PUT", "/config/draft", {"listeners": "none"}, 422, "listeners"),
    ("PUT", "/config/draft", {"surprise": 1}, 422, "surprise"),
    ("GET", "/config/revisions/99", None, 404, None),
    ("POST", "/config/rollback", {"revision": 0}, 422, "revision"),
    (
        "POST",
        "/config/import",
        {"document": {"hosted_domains": "x"}, "force": True},
        422,
        "hosted_domains",
    ),
    ("PUT", "/config/draft/admin", {"listen": "127.0.0.1:1"}, 422, "admin"),
    ("GET", "/queue?older_than=soon", None, 422, "older_than"),
    ("GET", "/queue/NOSUCHID", None, 404, None),
    ("POST", "/queue/NOSUCHID/hold", None, 404, None),
    ("POST", "/queue/NOSUCHID/explode", None, 422, "path.action"),
    ("DELETE", "/queue/NOSUCHID", None, 404, None),
    ("POST", "/policy/explain", {"recipients": []}, 422, "client_ip"),
    ("POST", "/policy/explain", {"client_ip": "127.0.0.1", "listener": "nothere"}, 422, "listener"),
    ("POST", "/connectors/nothere/verify", None, 404, None),
    ("POST", "/profiles/nothere/send-credentials", None, 422, "connection_profiles"),
    ("POST", "/secrets/encrypt", {"value": ""}, 422, "value"),
]


async def test_bad_input_on_every_resource_gets_a_clear_error(api: Api) -> None:
    """One gateway for the whole table (in order: the certificate row stages a draft)."""
    wrong = []
    for method, path, body, status, field in BAD_INPUT:
        response = await api.call(method, path, json=body)
        reply = response.json()
        named = field is None or any(field in p["path"] for p in reply.get("problems", []))
        sentence = status < 400 or isinstance(reply.get("detail"), str)
        if response.status_code != status or not named or not sentence:
            wrong.append((method, path, response.status_code, response.text))
        assert response.headers["content-type"] == "application/json"
        assert "Traceback" not in response.text
    assert wrong == []


async def test_a_stale_draft_write_is_refused(api: Api) -> None:
    draft = await api.ok("GET", "/config/draft")
    assert draft["staged"] is False
    await api.ok("PUT", "/config/draft/spoof_detection", json={"value": False})
    version = (await api.ok("GET", "/config/draft"))["version"]
    document = (await api.ok("GET", "/config/draft"))["document"]
    await api.ok("PUT", "/config/draft/spam", json={"check_outbound": True})  # someone else
    response = await api.call(
        "PUT", "/config/draft", json=document, headers={"If-Match": str(version)}
    )
    assert response.status_code == 409
    assert (await api.ok("GET", "/config/draft/spam"))["check_outbound"] is True


async def test_round_trip_export_import_diff_is_empty(api: Api) -> None:
    exported = (await api.ok("GET", "/config/export"))["yaml"]
    await api.ok("POST", "/config/import", json={"document": yaml.safe_load(exported)})
    assert (await api.ok("GET", "/config/diff"))["changes"] == []
    again = await api.call("POST", "/config/import", json={"document": yaml.safe_load(exported)})
    assert again.status_code == 409  # a staged draft is never replaced silently


async def test_queue_and_policy_operations(api: Api, sink: SinkHandle) -> None:
    await api.ok("PUT", "/config/draft/send_connectors/to-sink", json={
        "name": "to-sink",
        "deliver": {"smarthost": {"host": "127.0.0.1", "port": free_port()}},  # nobody there
        "security": "none",
    })  # fmt: skip
    await api.ok("POST", "/config/apply", json={})
    await api.wait_running(2)
    await asyncio.to_thread(_send, api.gateway.port, "127.0.0.1", "bob@example.com")
    listing: list[dict[str, Any]] = []
    for _ in range(50):
        listing = await api.ok("GET", "/queue", params={"recipient": "bob@example.com"})
        if listing:
            break
        await asyncio.sleep(0.1)
    message_id = listing[0]["id"]
    shown = await api.ok("GET", f"/queue/{message_id}")
    assert shown["recipients"][0]["address"] == "bob@example.com"
    held = await api.ok("POST", f"/queue/{message_id}/hold")
    assert held["state"] == "held"
    assert (await api.ok("GET", "/queue", params={"state": "held"}))[0]["id"] == message_id
    assert (await api.ok("POST", f"/queue/{message_id}/release"))["state"] == "queued"
    assert (await api.ok("DELETE", f"/queue/{message_id}"))["state"] == "deleted"
    assert (await api.call("GET", f"/queue/{message_id}")).status_code == 404
    audit = await api.ok("GET", "/audit")
    done = [
        (e["actor"], e["action"], e["detail"]) for e in audit if e["action"].startswith("queue.")
    ]
    assert done == [
        ("token:tests", "queue.delete", message_id),
        ("token:tests", "queue.release", message_id),
        ("token:tests", "queue.hold", message_id),
    ]

    explained = await api.ok(
        "POST",
        "/policy/explain",
        json={"client_ip": "127.0.0.2", "recipients": ["x@elsewhere.test"]},
    )
    assert explained["profile"]["name"] == "partner"
    steps = await api.ok("POST", "/connectors/to-sink/verify")
    assert [s["name"] for s in steps if not s["ok"]] == ["connect"]  # nobody listens there
    token = (await api.ok("POST", "/secrets/encrypt", json={"value": "s3cret"}))["value"]
    assert token.startswith("enc:v1:")
    assert "s3cret" not in token


async def test_the_cli_works_against_the_api(api: Api, tmp_path: Path) -> None:
    where = ["--api", api.url, "--token", api.token]
    code, out = await run_tool(SMTPGATE, "profile", "set", "partner", "relay=none", *where)
    assert code == 0, out
    code, out = await run_tool(SMTPGATE, "config", "diff", *where)
    assert "connection profile partner: relay full → none" in out
    code, out = await run_tool(SMTPGATE, "config", "apply", "--comment", "cli", *where)
    assert code == 0, out
    assert "applied as revision 2" in out
    code, out = await run_tool(SMTPGATE, "config", "history", "--json", *where)
    assert '"comment": "cli"' in out
    code, out = await run_tool(SMTPGATE, "profile", "set", "partner", "relay=sometimes", *where)
    assert code == 1
    assert "connection_profiles[0].relay" in out
    code, out = await run_tool(SMTPGATE, "config", "diff", "--api", api.url, "--token", "bad")
    assert code == 1
    assert "valid API token" in out
    exported = tmp_path / "exported.yaml"
    code, out = await run_tool(SMTPGATE, "config", "export", *where)
    exported.write_text(out)
    code, out = await run_tool(SMTPGATE, "config", "import", str(exported), *where)
    assert code == 0, out
    code, out = await run_tool(SMTPGATE, "config", "diff", *where)
    assert out.startswith("no changes")
    # the operations too: explain, queue, connector verify, credentials
    code, out = await run_tool(
        SMTPGATE, "policy", "explain", "--client-ip", "127.0.0.2", "--recipient",
        "x@elsewhere.test", *where,
    )  # fmt: skip
    assert code == 0, out
    assert "profile:      connection profile 'partner'" in out
    assert "recipient x@elsewhere.test: refuse" in out  # relay none since the apply above
    code, out = await run_tool(
        SMTPGATE, "policy", "explain", "--client-ip", "127.0.0.2", "--listener", "mx", *where
    )
    assert code == 0, out
    assert "listener:     listener mx: none: TLS not required before MAIL" in out
    code, out = await run_tool(
        SMTPGATE, "policy", "explain", "--client-ip", "127.0.0.2", "--listener", "nothere", *where
    )
    assert code == 2  # bad usage, as a bad --client-ip
    assert "argument --listener: no listener named 'nothere' (configured: mx)" in out
    code, out = await run_tool(SMTPGATE, "queue", "list", *where)
    assert code == 0, out
    assert "-- 0 message(s)" in out
    code, out = await run_tool(SMTPGATE, "queue", "hold", "NOSUCHID", *where)
    assert code == 1
    assert "no message NOSUCHID" in out
    code, out = await run_tool(SMTPGATE, "connector", "verify", "to-sink", *where)
    assert code == 0, out
    assert "ok   connect" in out


async def test_schemathesis_finds_no_server_error_or_schema_violation(api: Api) -> None:
    """Property-based requests from the OpenAPI spec: no 5xx, every status code,
    content type and body as documented, bad input rejected, auth enforced.

    ``positive_data_acceptance`` is left out on purpose: a configuration API
    must refuse many schema-valid documents (a profile whose client host
    another profile has, a connector naming no target), and says so with 422.
    """
    tool = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert tool, "schemathesis is a dev dependency (pip install -e '.[dev]')"
    code, out = await run_tool(
        tool,
        "run",
        f"{api.url}/openapi.json",
        "-H",
        f"Authorization: Bearer {api.token}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        "5",
        "--phases",
        "examples,coverage,fuzzing",
        "--generation-deterministic",
        "--no-color",
        "-w",
        "1",
        timeout=900,
    )
    assert code == 0, out[-6000:]


async def test_oversized_and_anonymous_bodies_are_refused_unread(api: Api) -> None:
    big = b'{"document": {"hosted_domains": ["' + b"a" * (5 * 1024 * 1024) + b'"]}}'
    headers = {"Content-Type": "application/json"}
    response = await api.call("POST", "/config/import", content=big, headers=headers)
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: streamed
        for _ in range(80):
            yield b" " * 65536

    response = await api.call("PUT", "/config/draft", content=chunks(), headers=headers)
    assert response.status_code == 413
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        response = await anonymous.post("/api/v1/config/import", content=big, headers=headers)
    assert response.status_code == 401
    assert (await api.ok("GET", "/config/draft"))["staged"] is False


def _serve_with_admin_port(tmp_path: Path, admin: int) -> str:
    """Run ``smtpgate serve`` told to use ``admin`` for its API: it must exit 1
    with a sentence, no traceback, and never open its SMTP port. Its stderr."""
    smtp = free_port()
    document = base_config(tmp_path / "second", 2526)
    document["listeners"][0]["address"] = f"127.0.0.1:{smtp}"
    document["admin"] = {"listen": f"127.0.0.1:{admin}"}
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(document))
    done = subprocess.run(
        [SMTPGATE, "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    expected = f"cannot start: the admin API cannot listen on 127.0.0.1:{admin} (admin.listen):"
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", smtp), timeout=1).close()  # SMTP never opened
    return done.stderr


def test_a_taken_api_port_stops_serve_before_smtp_listens(tmp_path: Path) -> None:
    with socket.socket() as squatter:  # listens, but is not our API
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        _serve_with_admin_port(tmp_path, squatter.getsockname()[1])


def test_a_second_gateway_on_the_same_admin_port_exits_before_smtp(
    gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """Gateway A's API answers on the port B was told to use: B must not take A's
    answer for its own, open SMTP, and let an administrator edit A through it."""
    admin = free_port()
    first = gateway_process(2526, admin={"listen": f"127.0.0.1:{admin}"})
    assert "ddress already in use" in _serve_with_admin_port(tmp_path, admin)
    assert first.process.poll() is None  # A is untouched


async def test_explain_over_the_api_looks_up_names_with_the_gateways_dns(
    gateway_process: Callable[..., GatewayProcess], sink: SinkHandle
) -> None:
    records = {
        ("5.0.0.127.in-addr.arpa", "PTR"): ["mail.partner.test."],
        ("mail.partner.test", "A"): ["127.0.0.5"],
    }
    dns, dns_port = await start_dns(records)
    try:
        port = free_port()
        gateway = gateway_process(
            sink.port,
            gateway={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2}},
            admin={"listen": f"127.0.0.1:{port}"},
            connection_profiles=[
                {"name": "by-name", "client_hosts": ["mail.partner.test"], "relay": "full"}
            ],
        )
        token = await asyncio.to_thread(make_token, gateway.config_path)
        where = ["--api", f"http://127.0.0.1:{port}", "--token", token]
        code, out = await run_tool(
            SMTPGATE, "policy", "explain", "--client-ip", "127.0.0.5", "--lookup", *where
        )
        assert code == 0, out
        assert "connection profile 'by-name'" in out
        assert "mail.partner.test" in out
    finally:
        assert dns.transport is not None
        dns.transport.close()
