"""The console's operation pages in-process: send connectors (edit, namespaces,
verify against a real sink), the queue (hold, release, delete), policy explain,
peers, history (rollback) and the audit log; the auditor may only read and
every change needs the CSRF token."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from smtpgate.admin import accounts, edit, nodes
from smtpgate.admin.api import create_app
from smtpgate.admin.services import ConfigService
from smtpgate.config.load import parse_config
from smtpgate.config.store import ConfigStore
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.queue.states import RecipientState
from smtpgate.queue.store import NewMessage, QueueStore, RecipientUpdate
from smtpgate.spool import SpooledBody, new_queue_id
from tests.conftest import SinkHandle, free_port

PASSWORD = "correct horse battery"


def document(data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "gateway": {"hostname": "gw.test", "data_dir": str(data_dir)},
        "hosted_domains": ["example.com"],
        "listeners": [{"name": "mx", "address": "127.0.0.1:2525", "security": "none"}],
        "connection_profiles": [{"name": "partner", "client_hosts": ["10.0.0.0/8"]}],
        "send_connectors": [
            {"name": "out", "security": "none", "deliver": {"smarthost": {"host": "relay.test"}}}
        ],
        **extra,
    }


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ConfigService]:
    data_dir = tmp_path / "var"
    service = ConfigService(ConfigStore.open(data_dir, ""), data_dir)
    service.adopt_file(parse_config(document(data_dir)), "file:gateway.yaml")
    accounts.create_user(service.store, "alice", PASSWORD, "admin", "test")
    accounts.create_user(service.store, "audrey", PASSWORD, "auditor", "test")
    yield service
    service.store.close()


def login(service: ConfigService, name: str = "alice") -> TestClient:
    client = TestClient(create_app(service))
    response = client.post("/login", data={"username": name, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return client


@pytest.fixture
def admin(service: ConfigService) -> TestClient:
    return login(service)


@pytest.fixture
def auditor(service: ConfigService) -> TestClient:
    return login(service, "audrey")


def csrf(client: TestClient, page: str = "/") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(page).text)
    assert found, "no CSRF token on the page"
    return found.group(1)


def post(client: TestClient, url: str, data: dict[str, Any] | None = None) -> Any:
    return client.post(url, data={"csrf": csrf(client), **(data or {})}, follow_redirects=False)


def connector(service: ConfigService, name: str = "out") -> dict[str, Any]:
    return edit.get_item(service.working()[0], "send_connectors", name)


def connector_form(**changes: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": "out",
        "deliver": "smarthost",
        "host": "relay.test",
        "port": "25",
        "username": "",
        "password": "",
        "password_file": "",
        "dns_port": "25",
        "security": "none",
        "client_certificate": "",
        "cost": "10",
        "roles": "",
        "failover_when_unreachable": "false",
        "ns_sender": ["*"],
        "ns_recipient": ["*"],
    }
    form.update(changes)
    return form


# -- send connectors ------------------------------------------------------------------


def test_connector_list_and_page_show_every_setting(admin: TestClient) -> None:
    page = admin.get("/connectors")
    assert page.status_code == 200
    assert "relay.test:25" in page.text
    assert 'href="/connectors/out"' in page.text
    page = admin.get("/connectors/out")
    for label in ("Host", "Security", "Client identity", "Cost", "Gateway roles", "Namespaces"):
        assert label in page.text
    assert "Fail over when unreachable" in page.text
    assert 'value="relay.test"' in page.text


def test_a_bad_port_shows_next_to_the_field_and_a_good_edit_reaches_the_draft(
    admin: TestClient, service: ConfigService
) -> None:
    bad = post(admin, "/connectors/out", connector_form(port="99999", cost="-1"))
    assert bad.status_code == 422
    assert re.search(r'id="error-deliver-smarthost-port"[^>]*>[^<]*less than 65536', bad.text)
    assert re.search(r'id="error-cost"[^>]*>[^<]*greater than or equal to 0', bad.text)
    assert service.diff() == []  # nothing staged

    good = post(
        admin,
        "/connectors/out",
        connector_form(port="587", security="require-starttls", cost="5", roles="edge\nhub"),
    )
    assert good.status_code == 303
    saved = connector(service)
    assert saved["deliver"]["smarthost"]["port"] == 587
    assert saved["security"] == "require-starttls"
    assert saved["cost"] == 5
    assert saved["roles"] == ["edge", "hub"]
    texts = [c.text() for c in service.diff()]
    assert any("port 25 → 587" in t for t in texts), texts
    assert re.search(rf"\b{len(texts)} pending changes", admin.get("/").text)


def test_the_password_is_encrypted_and_never_shown(
    admin: TestClient, service: ConfigService
) -> None:
    response = post(admin, "/connectors/out", connector_form(username="u1", password="s3cret!"))
    assert response.status_code == 303
    stored = connector(service)["deliver"]["smarthost"]
    assert stored["username"] == "u1"
    assert stored["password"].startswith("enc:v1:")
    page = admin.get("/connectors/out").text
    assert "s3cret!" not in page
    assert stored["password"] not in page
    assert "A password is stored" in page
    # a password without a user name: the schema's words, next to the smarthost fields
    lone = post(admin, "/connectors/out", connector_form(password="x"))
    assert lone.status_code == 422
    assert re.search(r'id="error-deliver-smarthost"[^>]*>[^<]*go together', lone.text)
    # saving again with an empty password keeps it
    assert (
        post(admin, "/connectors/out", connector_form(username="u1", cost="7")).status_code == 303
    )
    assert connector(service)["deliver"]["smarthost"]["password"] == stored["password"]


def test_the_namespace_editor_adds_and_removes_rows(
    admin: TestClient, service: ConfigService
) -> None:
    more = post(admin, "/connectors/out", connector_form(action="add-namespace"))
    assert more.status_code == 200
    assert more.text.count('name="ns_sender"') == 2  # the default row and an empty one
    assert service.diff() == []
    form = connector_form(
        ns_sender=["*", "example.com", ""],
        ns_recipient=["*", "*.partner.example", ""],
        ns_remove=["0"],
        action="save",
    )
    assert post(admin, "/connectors/out", form).status_code == 303
    assert connector(service)["namespaces"] == [
        {"sender": "example.com", "recipient": "*.partner.example"}
    ]
    page = admin.get("/connectors/out").text
    assert 'value="*.partner.example"' in page


def test_new_connector_by_dns_and_delete(admin: TestClient, service: ConfigService) -> None:
    assert "New send connector" in admin.get("/connectors/new").text
    form = connector_form(name="direct", deliver="dns", dns_port="25", cost="20")
    response = post(admin, "/connectors/new", form)
    assert response.status_code == 303, response.text
    assert connector(service, "direct")["deliver"]["dns"] == {"port": 25}
    duplicate = post(admin, "/connectors/new", form)
    assert duplicate.status_code == 422
    assert "exists already" in duplicate.text
    assert "Delete send connector direct?" in admin.get("/connectors/direct/delete").text
    assert post(admin, "/connectors/direct/delete").status_code == 303
    names = [c["name"] for c in service.working()[0]["send_connectors"]]
    assert names == ["out"]


async def test_verify_a_smarthost_shows_each_step(tmp_path: Path, sink: SinkHandle) -> None:
    data_dir = tmp_path / "verify"
    service = ConfigService(ConfigStore.open(data_dir, ""), data_dir)
    connectors = [
        {
            "name": "sink",
            "security": "none",
            "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
        },
        {
            "name": "down",
            "security": "none",
            "cost": 20,
            "deliver": {"smarthost": {"host": "127.0.0.1", "port": free_port()}},
        },
    ]
    service.adopt_file(
        parse_config(document(data_dir, send_connectors=connectors)), "file:gateway.yaml"
    )
    accounts.create_user(service.store, "alice", PASSWORD, "admin", "test")
    try:
        client = await asyncio.to_thread(login, service)
        token = await asyncio.to_thread(csrf, client)
        good = await asyncio.to_thread(client.post, "/connectors/sink/verify", data={"csrf": token})
        assert good.status_code == 200
        steps = re.findall(r'<li class="(ok|bad)"><strong>([^<]+)</strong>', good.text)
        names = [name for _ok, name in steps]
        assert {"connect", "greeting", "EHLO"} <= set(names), steps
        assert all(ok == "ok" for ok, _name in steps), steps
        bad = await asyncio.to_thread(client.post, "/connectors/down/verify", data={"csrf": token})
        assert ("bad", "connect") in re.findall(
            r'<li class="(ok|bad)"><strong>([^<]+)</strong>', bad.text
        )
    finally:
        service.store.close()


# -- the queue ----------------------------------------------------------------------------


def deferred_message(service: ConfigService) -> str:
    """A message for carol@example.net whose first attempt failed (451)."""
    store = QueueStore(service.data_dir / "queue")
    try:
        body = SpooledBody(store.bodies, new_queue_id())
        body.write(b"From: bob@example.org\r\nSubject: stuck here\r\n\r\nhello\r\n")
        body.finish()
        envelope = Envelope(
            "bob@example.org", (Recipient("carol@example.net"),), client_ip="10.1.2.3"
        )
        store.ingest([NewMessage(envelope, body)])
        reply = "451 4.4.1 no answer from the next hop"
        later = time.time() + 3600
        store.apply([RecipientUpdate(body.queue_id, 0, RecipientState.DEFERRED, reply, later)])
        return body.queue_id
    finally:
        store.close()


def state_of(service: ConfigService, message_id: str) -> str | None:
    store = QueueStore(service.data_dir / "queue")
    try:
        message = store.get(message_id)
        return None if message is None else str(message.recipients[0].state)
    finally:
        store.close()


def test_queue_list_filters_and_message_page(admin: TestClient, service: ConfigService) -> None:
    message_id = deferred_message(service)
    listing = admin.get("/queue", params={"state": "deferred", "domain": "example.net"})
    assert listing.status_code == 200
    assert message_id in listing.text
    assert "carol@example.net" in listing.text
    assert message_id not in admin.get("/queue", params={"state": "held"}).text
    bad = admin.get("/queue", params={"older_than": "soon"})
    assert bad.status_code == 422
    assert re.search(r'id="error-older_than"[^>]*>[^<]*not a duration', bad.text)
    page = admin.get(f"/queue/{message_id}").text
    assert "451 4.4.1 no answer from the next hop" in page
    assert "stuck here" in page
    assert "10.1.2.3" in page
    assert admin.get("/queue/NOSUCH").status_code == 404


def test_queue_hold_release_delete_change_the_state(
    admin: TestClient, service: ConfigService
) -> None:
    message_id = deferred_message(service)
    assert post(admin, f"/queue/{message_id}/hold").status_code == 303
    assert state_of(service, message_id) == "held"
    assert post(admin, f"/queue/{message_id}/release").status_code == 303
    assert state_of(service, message_id) == "queued"
    page = admin.get(f"/queue/{message_id}", params={"done": "release"}).text
    assert "queued" in page
    assert post(admin, f"/queue/{message_id}/delete").status_code == 303
    assert state_of(service, message_id) is None
    actions = [(e.actor, e.action, e.detail) for e in service.store.audit_log(10)]
    assert ("user:alice", "queue.delete", message_id) in actions
    assert ("user:alice", "queue.hold", message_id) in actions


# -- policy explain ---------------------------------------------------------------------


def test_explain_shows_the_verdict_for_a_relay_denied_recipient(admin: TestClient) -> None:
    question = {
        "client_ip": "192.0.2.7",
        "helo": "client.example",
        "sender": "someone@example.org",
        "recipients": "friend@elsewhere.example\nalice@example.com",
        "listener": "mx",
    }
    page = admin.get("/explain", params=question)
    assert page.status_code == 200
    assert "recipient friend@elsewhere.example: refuse 5" in page.text
    assert "Relay access denied" in page.text
    assert "recipient alice@example.com: accept" in page.text
    assert 'value="192.0.2.7"' in page.text  # the form keeps the question


def test_explain_a_bad_ip_shows_next_to_the_field(admin: TestClient) -> None:
    page = admin.get("/explain", params={"client_ip": "10.0.0.300"})
    assert page.status_code == 422
    assert re.search(r'id="error-client_ip"[^>]*>[^<]*does not appear to be an IPv4', page.text)
    assert admin.get("/explain").status_code == 200  # no question yet: just the form


def test_explain_names_an_unknown_listener(admin: TestClient) -> None:
    page = admin.get("/explain", params={"client_ip": "10.0.0.1", "listener": "nope"})
    assert page.status_code == 422
    assert re.search(r'id="error-listener"[^>]*>[^<]*no listener named', page.text)


# -- peers, history, audit log -----------------------------------------------------------


def test_peers_shows_each_node_and_forgets_a_down_one(
    admin: TestClient, service: ConfigService
) -> None:
    now = time.time()
    report = {"running_revision": 1, "roles": ["edge"], "version": "9.9", "queue": {"deferred": 2}}
    nodes.publish(service.store, "gw1", report, now)
    nodes.publish(service.store, "gw9", {**report, "error": "disk full"}, now - 3600)
    page = admin.get("/peers").text
    assert "gw1" in page
    assert "gw9" in page
    assert "disk full" in page
    assert "deferred 2" in page
    assert 'action="/peers/gw9/forget"' in page
    assert 'action="/peers/gw1/forget"' not in page  # up: no button
    refused = post(admin, "/peers/gw1/forget")
    assert refused.status_code == 409
    assert "is up" in refused.text
    assert post(admin, "/peers/gw9/forget").status_code == 303
    assert "gw9" not in nodes.reports(service.store)
    assert ("user:alice", "cluster forget", "gw9") in [
        (e.actor, e.action, e.detail) for e in service.store.audit_log(5)
    ]


def apply_change(service: ConfigService, cost: int) -> None:
    def change(doc: dict[str, Any]) -> dict[str, Any]:
        item = edit.apply_edits(edit.get_item(doc, "send_connectors", "out"), [f"cost={cost}"])
        return edit.replace_item(doc, "send_connectors", "out", item)

    service.edit(change, "test", "cost")
    service.apply("test", f"cost {cost}")


def test_history_shows_each_diff_and_rollback_stages_a_draft(
    admin: TestClient, service: ConfigService
) -> None:
    apply_change(service, 20)
    page = admin.get("/history").text
    assert "Revision 2" in page
    assert "cost 20" in page
    assert "send connector out: cost 10 → 20" in page
    assert 'action="/history/1/rollback"' in page
    assert 'action="/history/2/rollback"' not in page  # the running one
    response = post(admin, "/history/1/rollback")
    assert response.status_code == 303
    assert response.headers["location"] == "/changes"
    assert connector(service)["cost"] == 10
    assert [c.text() for c in service.diff()] == ["send connector out: cost 20 → 10"]
    # a second rollback meets the staged draft: explained, replaced only when asked
    conflict = post(admin, "/history/2/rollback")
    assert conflict.status_code == 409
    assert "Replace the draft with revision 2" in conflict.text
    assert post(admin, "/history/2/rollback", {"replace_draft": "true"}).status_code == 303
    assert service.diff() == []


def test_audit_log_newest_first_and_filtered(admin: TestClient, service: ConfigService) -> None:
    apply_change(service, 30)
    table = admin.get("/audit").text.split('<table id="audit">')[1]
    assert table.index("<td>apply</td>") < table.index("<td>user.create</td>")  # newest first
    only = admin.get("/audit", params={"actor": "test", "action": "draft"}).text
    assert "draft.edit" in only
    assert "user.create" not in only
    assert "cost 10 → 30" in only


# -- the auditor and CSRF ---------------------------------------------------------------

CHANGES = [
    "/connectors/out",
    "/connectors/new",
    "/connectors/out/verify",
    "/connectors/out/delete",
    "/queue/ABC/hold",
    "/queue/ABC/delete",
    "/queue/retry-all",
    "/peers/gw9/forget",
    "/history/1/rollback",
]


def test_the_auditor_reads_but_gets_403_on_every_post(auditor: TestClient) -> None:
    pages = ("/connectors", "/connectors/out", "/queue", "/explain", "/peers", "/history", "/audit")
    for page in pages:
        response = auditor.get(page)
        assert response.status_code == 200, page
        assert "Save to the draft" not in response.text
    assert "Roll back" not in auditor.get("/history").text
    token = csrf(auditor)
    for url in CHANGES:
        response = auditor.post(url, data={"csrf": token}, follow_redirects=False)
        assert response.status_code == 403, url


def test_a_post_without_the_csrf_token_is_refused(admin: TestClient) -> None:
    for url in CHANGES:
        response = admin.post(url, data={}, follow_redirects=False)
        assert response.status_code == 403, url
