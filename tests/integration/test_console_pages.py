"""What every console page shares: the login, the session cookie's flags, the
browser-side protections, errors as pages (the API keeps JSON), Changes Made."""

from __future__ import annotations

from fastapi.testclient import TestClient

from smtpgate.admin.api import create_app
from smtpgate.admin.services import ConfigService
from tests.integration import test_console_profiles as shared

PASSWORD, post = shared.PASSWORD, shared.post
service, admin, auditor = shared.service, shared.admin, shared.auditor  # the fixtures


def test_pages_need_a_login_and_a_wrong_password_is_refused(service: ConfigService) -> None:
    client = TestClient(create_app(service))
    response = client.get("/profiles", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/login")
    wrong = client.post("/login", data={"username": "alice", "password": "nope" * 4})
    assert wrong.status_code == 401
    assert "wrong user name or password" in wrong.text
    assert "smtpgate_console" not in client.cookies
    right = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert right.status_code == 200
    assert "alice (admin)" in right.text


def test_the_session_cookie_is_httponly_and_samesite_strict(service: ConfigService) -> None:
    client = TestClient(create_app(service))
    response = client.post(
        "/login", data={"username": "alice", "password": PASSWORD}, follow_redirects=False
    )
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "secure" not in cookie  # plain HTTP here; HTTPS sets it (browser test)


def test_every_page_tells_the_browser_to_protect_it(admin: TestClient) -> None:
    response = admin.get("/")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


def test_a_refusal_on_a_page_is_a_page_and_the_api_still_answers_json(
    auditor: TestClient,
) -> None:
    refused = post(auditor, "/domains", {"domain": "example.net"})
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("text/html")
    assert "may only read" in refused.text
    api = auditor.get("/api/v1/config/draft")  # a console session is not an API token
    assert api.status_code == 401
    assert api.headers["content-type"] == "application/json"


def test_changes_made_shows_the_diff_and_discard_leaves_the_running_revision(
    service: ConfigService, admin: TestClient
) -> None:
    applied = service.store.applied_number()
    assert post(admin, "/domains", {"domain": "example.net"}).status_code == 303
    page = admin.get("/changes").text
    assert "1 pending change" in page
    assert "hosted domains: added example.net" in page
    assert post(admin, "/changes/discard", {}).status_code == 303
    assert "0 pending changes" in admin.get("/").text
    assert service.store.applied_number() == applied
    assert service.draft() is None


def test_apply_from_changes_made_makes_a_revision_and_reports_the_peers(
    service: ConfigService, admin: TestClient
) -> None:
    post(admin, "/domains", {"domain": "example.net"})
    response = post(admin, "/changes/apply", {"comment": "add example.net"})
    assert response.status_code == 200
    assert "Revision 2 applied" in response.text
    assert service.store.applied_number() == 2
    assert "example.net" in service.applied().document["hosted_domains"]


def test_a_deleted_user_or_a_changed_password_ends_the_session_and_a_new_role_counts(
    service: ConfigService, admin: TestClient
) -> None:
    from smtpgate.admin import accounts  # noqa: PLC0415

    accounts.set_role(service.store, "alice", "auditor", "test")
    assert "alice (auditor)" in admin.get("/").text
    assert post(admin, "/domains", {"domain": "example.net"}).status_code == 403
    accounts.set_password(service.store, "alice", "another long password", "test")
    response = admin.get("/", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/login")


def test_an_idle_session_must_log_in_again(service: ConfigService) -> None:
    now = [1000.0]
    client = TestClient(create_app(service, clock=lambda: now[0]))
    client.post("/login", data={"username": "alice", "password": PASSWORD})
    now[0] += 899  # used within the idle time: still logged in, and touched
    assert client.get("/", follow_redirects=False).status_code == 200
    now[0] += 901
    response = client.get("/", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/login")


def test_the_default_profile_is_edited_like_a_profile(
    service: ConfigService, admin: TestClient, auditor: TestClient
) -> None:
    page = admin.get("/default-profile")
    assert page.status_code == 200
    assert 'action="/default-profile/relay"' in page.text
    assert post(admin, "/default-profile/relay", {"relay": "sometimes"}).status_code == 422
    assert post(admin, "/default-profile/relay", {"relay": "blocked"}).status_code == 303
    assert service.working()[0]["default_profile"]["relay"] == "blocked"
    tls = {"inbound_mandatory": "true", "protocols_global": "true", "cipher_strength": "global"}
    assert post(admin, "/default-profile/tls", tls).status_code == 303
    assert service.working()[0]["default_profile"]["inbound_tls"]["mandatory"] is True
    assert "default profile: relay none → blocked" in admin.get("/changes").text
    assert 'action="/default-profile/relay"' not in auditor.get("/default-profile").text
    assert post(auditor, "/default-profile/relay", {"relay": "none"}).status_code == 403


def test_every_other_shared_section_is_edited_as_yaml_and_checked(
    service: ConfigService, admin: TestClient, auditor: TestClient
) -> None:
    page = admin.get("/settings").text
    for section in ("spam", "virus", "sender_auth", "outbound_security", "receive_connectors"):
        assert f'id="{section}"' in page
    assert 'id="listeners"' not in page  # node-local: each node's file
    bad = post(admin, "/settings/virus", {"text": "clamd: nowhere\ninfected: shrug\n"})
    assert bad.status_code == 422
    assert "virus.infected" in bad.text
    assert "shrug" in bad.text  # what was typed stays in the box
    broken = post(admin, "/settings/spam", {"text": "check_outbound: [\n"})
    assert broken.status_code == 422
    assert "YAML syntax error" in broken.text
    good = post(admin, "/settings/spam", {"text": "check_outbound: true\n"})
    assert good.status_code == 303
    assert service.working()[0]["spam"]["check_outbound"] is True
    assert "spam: check_outbound false → true" in admin.get("/changes").text
    assert 'action="/settings/spam"' not in auditor.get("/settings").text
    assert post(auditor, "/settings/spam", {"text": "check_outbound: false\n"}).status_code == 403


def test_dmarc_enforcement_is_set_per_profile_and_for_the_default(
    service: ConfigService, admin: TestClient
) -> None:
    assert 'action="/profiles/partner/dmarc"' in admin.get("/profiles/partner").text
    assert post(admin, "/profiles/partner/dmarc", {"dmarc_policy": "report"}).status_code == 303
    assert post(admin, "/default-profile/dmarc", {"dmarc_policy": "report"}).status_code == 303
    assert post(admin, "/default-profile/dmarc", {"dmarc_policy": "maybe"}).status_code == 422
    document = service.working()[0]
    assert document["connection_profiles"][0]["dmarc_policy"] == "report"
    assert document["default_profile"]["dmarc_policy"] == "report"
