"""The console's connection profile pages, in process: what an administrator
sees, what reaches the draft, and what an auditor and a forged form get."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from smtpgate.admin import edit
from smtpgate.admin.accounts import create_user
from smtpgate.admin.api import create_app
from smtpgate.admin.services import ConfigService
from smtpgate.config.load import parse_config
from smtpgate.config.store import ConfigStore

PASSWORD = "correct horse battery"


def document(data_dir: Path) -> dict[str, Any]:
    return {
        "gateway": {"hostname": "gw.test", "data_dir": str(data_dir)},
        "hosted_domains": ["example.com"],
        "listeners": [{"name": "mx", "address": "127.0.0.1:2525", "security": "none"}],
        "connection_profiles": [{"name": "partner", "client_hosts": ["10.0.0.0/8"]}],
    }


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ConfigService]:
    data_dir = tmp_path / "var"
    service = ConfigService(ConfigStore.open(data_dir, ""), data_dir)
    service.adopt_file(parse_config(document(data_dir)), "file:gateway.yaml")
    create_user(service.store, "alice", PASSWORD, "admin", "test")
    create_user(service.store, "audrey", PASSWORD, "auditor", "test")
    yield service
    service.store.close()


def login(service: ConfigService, name: str = "alice") -> TestClient:
    client = TestClient(create_app(service))
    response = client.post("/login", data={"username": name, "password": PASSWORD})
    assert response.status_code == 200, response.text  # followed to the dashboard
    return client


@pytest.fixture
def admin(service: ConfigService) -> TestClient:
    return login(service)


@pytest.fixture
def auditor(service: ConfigService) -> TestClient:
    return login(service, "audrey")


def csrf(client: TestClient, page: str = "/") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(page).text)
    assert found
    return found.group(1)


def post(client: TestClient, path: str, data: dict[str, Any], **kwargs: Any) -> Any:
    """A form POST with the session's CSRF token; redirects not followed."""
    return client.post(path, data={"csrf": csrf(client), **data}, follow_redirects=False, **kwargs)


def profile(service: ConfigService, name: str) -> dict[str, Any]:
    found: dict[str, Any] = edit.get_item(service.working()[0], "connection_profiles", name)
    return found


def error_next_to(html: str, field: str) -> str:
    """The text of the field ``f-FIELD``'s block (its label, input and errors)."""
    start = html.index(f'id="f-{field}"')
    return html[start : html.index("</div>", start)]


# -- a new profile -------------------------------------------------------------------


def test_a_bad_cidr_is_shown_under_client_hosts_and_changes_nothing(
    service: ConfigService, admin: TestClient
) -> None:
    before = service.working()[0]
    response = post(
        admin, "/profiles", {"name": "lab", "client_hosts": "10.0.0.300/8", "relay": "full"}
    )
    assert response.status_code == 422
    block = error_next_to(response.text, "client_hosts")
    assert "field-error" in block
    assert "&#39;10.0.0.300/8&#39; is not a CIDR range" in block
    assert "Traceback" not in response.text
    assert service.working()[0] == before
    assert service.store.draft() is None

    response = post(
        admin, "/profiles", {"name": "lab", "client_hosts": "10.9.0.0/16", "relay": "full"}
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/profiles/lab"
    assert profile(service, "lab")["client_hosts"] == ["10.9.0.0/16"]
    page = admin.get("/profiles/lab").text
    assert "1 pending change" in page
    assert "10.9.0.0/16" in page


def test_a_duplicate_name_is_shown_under_the_name(
    service: ConfigService, admin: TestClient
) -> None:
    response = post(admin, "/profiles", {"name": "partner", "client_hosts": "", "relay": "none"})
    assert response.status_code == 422
    assert "exists already" in error_next_to(response.text, "name")


def test_the_list_shows_each_profile(service: ConfigService, admin: TestClient) -> None:
    html = admin.get("/profiles").text
    assert '<a href="/profiles/partner">partner</a>' in html
    assert "New profile" in html


# -- one profile ---------------------------------------------------------------------


def test_a_legacy_wildcard_is_converted_with_a_notice(
    service: ConfigService, admin: TestClient
) -> None:
    response = post(admin, "/profiles/partner/hosts", {"client_hosts": "10.0.0.0/8\n192.168.*.*"})
    assert response.status_code == 303
    assert profile(service, "partner")["client_hosts"] == ["10.0.0.0/8", "192.168.0.0/16"]
    html = admin.get("/profiles/partner").text
    assert "legacy wildcard 192.168.*.* converted to 192.168.0.0/16" in html
    assert "converted to 192.168.0.0/16" not in admin.get("/profiles/partner").text  # once


def test_a_bad_host_on_the_profile_page_keeps_what_was_typed(
    service: ConfigService, admin: TestClient
) -> None:
    response = post(admin, "/profiles/partner/hosts", {"client_hosts": "10.0.0.0/8\nbad host!"})
    assert response.status_code == 422
    block = error_next_to(response.text, "client_hosts")
    assert "bad host!" in block
    assert "is neither an IP address, a CIDR range nor a host name" in block
    assert profile(service, "partner")["client_hosts"] == ["10.0.0.0/8"]


def test_relay_mode_change(service: ConfigService, admin: TestClient) -> None:
    html = admin.get("/profiles/partner").text
    row = html[html.index('<th scope="row">restricted-internal</th>') :]
    assert "<td>no</td>" in row[: row.index("</tr>")]  # spam.check_outbound is off
    response = post(admin, "/profiles/partner/relay", {"relay": "restricted-external"})
    assert response.status_code == 303
    assert profile(service, "partner")["relay"] == "restricted-external"
    assert [c.text() for c in service.diff()] != []

    response = post(admin, "/profiles/partner/relay", {"relay": "sometimes"})
    assert response.status_code == 422
    assert "&#39;sometimes&#39; is not one of" in error_next_to(response.text, "relay")


def test_sender_domains_and_tls(service: ConfigService, admin: TestClient) -> None:
    response = post(admin, "/profiles/partner/domains", {"sender_domains": "Partner.EXAMPLE"})
    assert response.status_code == 303
    assert profile(service, "partner")["sender_domains"] == ["partner.example"]
    form = {
        "inbound_mandatory": ["false", "true"],
        "outbound_mandatory": ["false", "true"],
        "validate_certificate": "false",
        "protocols_global": "false",
        "protocols": ["TLSv1.2", "TLSv1.3"],
        "cipher_strength": "medium",
        "match": "hostname\nmx.partner.example",
    }
    response = post(admin, "/profiles/partner/tls", form)
    assert response.status_code == 303, response.text
    found = profile(service, "partner")
    assert found["inbound_tls"] == {"mandatory": True}
    assert found["outbound_tls"]["mandatory"] is True
    assert found["outbound_tls"]["protocols"] == ["TLSv1.2", "TLSv1.3"]
    assert found["outbound_tls"]["cipher_strength"] == "medium"
    assert found["outbound_tls"]["match"] == ["hostname", "mx.partner.example"]


def test_smtp_auth_users_are_stored_encrypted(service: ConfigService, admin: TestClient) -> None:
    assert post(admin, "/profiles/partner/auth", {"enabled": ["false", "true"]}).status_code == 303
    response = post(admin, "/profiles/partner/users", {"username": "app", "password": "s3cret!"})
    assert response.status_code == 303
    auth = profile(service, "partner")["smtp_auth"]
    assert auth["enabled"] is True
    assert auth["credentials"][0]["username"] == "app"
    assert auth["credentials"][0]["password"].startswith("enc:v1:")
    html = admin.get("/profiles/partner").text
    assert "s3cret!" not in html
    assert "enc:v1:" not in html
    assert "app" in html

    response = post(admin, "/profiles/partner/users", {"username": "app", "password": "x"})
    assert response.status_code == 409
    assert "exists already" in response.text

    response = post(admin, "/profiles/partner/users/remove", {"username": "app"})
    assert response.status_code == 303
    assert profile(service, "partner")["smtp_auth"]["credentials"] == []


def test_send_credentials_says_what_is_missing(service: ConfigService, admin: TestClient) -> None:
    response = post(admin, "/profiles/partner/send-credentials", {})
    assert response.status_code == 422
    assert "tick the box to confirm" in error_next_to(response.text, "confirm")
    response = post(admin, "/profiles/partner/send-credentials", {"confirm": "yes"})
    assert response.status_code == 422
    assert "gateway.admin_address: needed to send credentials" in response.text


def test_send_credentials_queues_them_for_the_administrator(
    service: ConfigService, admin: TestClient
) -> None:
    post(admin, "/profiles/partner/users", {"username": "app", "password": "s3cret!"})
    connector = {"name": "out", "deliver": {"smarthost": {"host": "127.0.0.1", "port": 2526}}}

    def change(document: dict[str, Any]) -> dict[str, Any]:
        gateway = {**document["gateway"], "admin_address": "admin@example.com"}
        return {**document, "gateway": gateway, "send_connectors": [connector]}

    service.edit(change, "test", "admin address and a connector")
    service.apply("test")
    response = post(admin, "/profiles/partner/send-credentials", {"confirm": "yes"})
    assert response.status_code == 303, response.text
    html = admin.get("/profiles/partner").text
    assert "are queued for admin@example.com" in html
    assert "s3cret!" not in html
    [entry] = [e for e in service.store.audit_log(5) if e.action == "credentials.send"]
    assert entry.actor == "user:alice"


def test_rename_and_delete(service: ConfigService, admin: TestClient) -> None:
    response = post(admin, "/profiles/partner/general", {"new_name": "partners", "notes": "hi"})
    assert response.status_code == 303
    assert response.headers["location"].startswith("/profiles/partners")
    confirm = admin.get("/profiles/partners/delete")
    assert "Delete connection profile partners?" in confirm.text
    response = post(admin, "/profiles/partners/delete", {})
    assert response.status_code == 303
    assert edit.items(service.working()[0], "connection_profiles") == []


def test_an_unknown_profile_is_404(admin: TestClient) -> None:
    assert admin.get("/profiles/nobody").status_code == 404


# -- who may change ---------------------------------------------------------------------


def test_an_auditor_sees_no_forms_and_cannot_post(
    service: ConfigService, auditor: TestClient
) -> None:
    for page in ("/profiles", "/profiles/partner"):
        html = auditor.get(page).text
        assert 'action="/profiles' not in html
        assert "10.0.0.0/8" in html or page == "/profiles"
    response = post(auditor, "/profiles/partner/relay", {"relay": "full"})
    assert response.status_code == 403
    response = post(auditor, "/profiles", {"name": "x", "client_hosts": "", "relay": "none"})
    assert response.status_code == 403
    assert service.store.draft() is None


def test_a_post_without_csrf_is_refused(service: ConfigService, admin: TestClient) -> None:
    response = admin.post("/profiles/partner/relay", data={"relay": "full"}, follow_redirects=False)
    assert response.status_code == 403
    response = admin.post(
        "/profiles/partner/relay", data={"relay": "full", "csrf": "forged"}, follow_redirects=False
    )
    assert response.status_code == 403
    assert service.store.draft() is None


def test_a_name_with_a_space_works_in_links(service: ConfigService, admin: TestClient) -> None:
    response = post(admin, "/profiles", {"name": "lab two", "client_hosts": "", "relay": "none"})
    assert response.headers["location"] == "/profiles/lab%20two"
    assert admin.get(response.headers["location"]).status_code == 200
    assert 'href="/profiles/lab%20two"' in admin.get("/profiles").text
