"""The web console in a real browser (Debian's chromium, Playwright's sync API)
against a real ``smtpgate serve`` whose admin listener serves HTTPS, with a
real recording sink. Each test asserts what the administrator sees.

One gateway and one browser for the whole module; each test opens its own
browser context (its own cookies). See ``tests/browser.py``.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509 import load_pem_x509_certificates
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from smtpgate.admin.api import admin_tls_context
from smtpgate.config import parse_config
from smtpgate.errors import ConfigError
from tests.browser import (
    DEFERRED,
    ELSEWHERE,
    PARTNER_IP,
    PASSWORDS,
    SMARTHOST_USER,
    VIEWPORT,
    Screenshots,
    Served,
    chromium,
    serve_console,
    slug,
)
from tests.conftest import Certs, base_config, merge
from tests.postfix import Postfix, instance_directory


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Served]:
    yield from serve_console(tmp_path_factory.mktemp("console"), certs)


@pytest.fixture(scope="module")
def chrome() -> Iterator[Browser]:
    executable = chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture
def visitor(chrome: Browser, served: Served) -> Iterator[BrowserContext]:
    """A browser context of its own (cookies) for each test. The test
    certificate's CA is not the browser's: accept it (the page is ours)."""
    context = chrome.new_context(base_url=served.url, ignore_https_errors=True, viewport=VIEWPORT)  # type: ignore[arg-type]
    context.set_default_timeout(10_000)
    yield context
    context.close()


def log_in(visitor: BrowserContext, user: str, password: str | None = None) -> Page:
    page = visitor.new_page()
    page.goto("/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password or PASSWORDS[user])
    page.get_by_role("button", name="Log in").click()
    return page


def csrf_of(page: Page) -> str:
    value = page.locator('input[name="csrf"]').first.get_attribute("value")
    assert value
    return value


# -- accounts, sessions, CSRF ---------------------------------------------------------


def test_a_wrong_password_is_refused_and_the_right_one_logs_in(
    visitor: BrowserContext, served: Served, shots: Screenshots
) -> None:
    page = visitor.new_page()
    page.goto("/")  # no session: to the login page
    assert page.url.endswith("/login")
    shots.take(page, "login")
    page = log_in(visitor, "alice", "not the password")
    expect(page.get_by_role("alert")).to_have_text("wrong user name or password")
    assert page.url.endswith("/login")
    assert not visitor.cookies()
    page = log_in(visitor, "alice")
    assert page.url == served.url + "/"
    expect(page.locator("header .who")).to_have_text("alice (admin)")
    expect(page.locator("#pending")).to_contain_text("pending change")


def test_the_session_cookie_is_httponly_strict_and_secure_over_https(
    visitor: BrowserContext,
) -> None:
    log_in(visitor, "alice")
    (cookie,) = [c for c in visitor.cookies() if c["name"] == "smtpgate_console"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is True  # the admin listener serves HTTPS
    assert cookie["path"] == "/"


def test_a_post_without_the_csrf_token_is_refused(visitor: BrowserContext) -> None:
    page = log_in(visitor, "alice")
    refused = page.request.post("/changes/discard", form={})
    assert refused.status == 403
    assert "CSRF" in refused.text()
    wrong = page.request.post("/changes/discard", form={"csrf": "forged"})
    assert wrong.status == 403
    # the page's own token is accepted (the same request, as the form sends it)
    accepted = page.request.post("/changes/discard", form={"csrf": csrf_of(page)}, max_redirects=0)
    assert accepted.status == 303


def test_the_auditor_sees_no_buttons_and_a_forged_post_is_refused(
    visitor: BrowserContext, served: Served, request: pytest.FixtureRequest
) -> None:
    served.cli("domain", "add", "audited.example")  # a pending change, so admins see buttons
    request.addfinalizer(lambda: served.cli("config", "discard"))
    page = log_in(visitor, "oscar")
    expect(page.locator("header .who")).to_have_text("oscar (auditor)")
    expect(page.locator("#pending")).to_have_text("1 pending change")
    page.goto("/changes")
    expect(page.locator("ul.diff")).to_contain_text("audited.example")
    expect(page.get_by_role("heading", name="Changes Made")).to_be_visible()
    expect(page.get_by_role("button", name="Apply configuration")).to_have_count(0)
    expect(page.get_by_role("button", name="Discard")).to_have_count(0)
    # with the session's own CSRF token, a POST from the auditor is still refused
    forged = page.request.post("/changes/apply", form={"csrf": csrf_of(page)})
    assert forged.status == 403
    assert "auditor" in forged.text()
    forged = page.request.post("/changes/discard", form={"csrf": csrf_of(page)})
    assert forged.status == 403


def test_every_page_has_a_screenshot(visitor: BrowserContext, shots: Screenshots) -> None:
    from smtpgate.admin.console.app import NAVIGATION  # noqa: PLC0415

    page = log_in(visitor, "alice")
    taken = []
    for label, href in NAVIGATION:
        response = page.goto(href)
        assert response is not None, (label, href)
        assert response.status == 200, (label, href)
        expect(page.locator("main")).to_be_visible()
        taken.append(shots.take(page, slug(href)))
    page.goto("/changes")
    taken.append(shots.take(page, "changes"))
    assert all(path.stat().st_size > 1000 for path in taken)
    assert len(taken) == len(NAVIGATION) + 1


# -- the Changes Made workflow -------------------------------------------------------


def test_a_profile_from_a_bad_cidr_to_a_client_that_relays(
    visitor: BrowserContext, served: Served, shots: Screenshots
) -> None:
    """A bad CIDR is shown next to its field; fixed, the profile is one pending
    change; its diff is shown; Apply reports the peer; a client from that
    address now relays (the message reaches the sink)."""
    with pytest.raises(smtplib.SMTPRecipientsRefused):  # no profile yet: no relaying
        served.send(ELSEWHERE, source=PARTNER_IP)
    page = log_in(visitor, "alice")
    shots.take(page, "dashboard")
    page.goto("/profiles")
    page.get_by_label("Name", exact=True).fill("partners")
    page.get_by_label("Client hosts").fill(f"{PARTNER_IP}\n10.1.0.0/33")
    page.get_by_label("Relay mode").select_option("full")
    page.get_by_role("button", name="Add profile").click()
    field = page.locator(".field.invalid").filter(has=page.get_by_label("Client hosts"))
    expect(field.locator(".field-error")).to_contain_text("10.1.0.0/33")
    expect(page.locator("#pending")).to_have_text("0 pending changes")

    page.get_by_label("Client hosts").fill(PARTNER_IP)
    page.get_by_role("button", name="Add profile").click()
    expect(page).to_have_url(f"{served.url}/profiles/partners")
    expect(page.locator("#pending")).to_have_text("1 pending change")
    shots.take(page, "profile")

    page.locator("#pending").click()
    expect(page.get_by_role("heading", name="Changes Made")).to_be_visible()
    expect(page.locator("ul.diff")).to_contain_text("partners")
    shots.take(page, "changes-diff")
    page.get_by_label("Comment").fill("partners relay through us")
    page.get_by_role("button", name="Apply configuration").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("applied")
    expect(page.locator("#apply-report")).to_contain_text("gw1")
    expect(page.locator("#apply-report tbody td").nth(1)).to_contain_text("applied")
    expect(page.locator("#pending")).to_have_text("0 pending changes")
    shots.take(page, "applied")

    deadline = time.monotonic() + 10
    while True:  # the gateway takes the revision on within a second
        try:
            served.send(ELSEWHERE, source=PARTNER_IP)
            break
        except smtplib.SMTPRecipientsRefused:
            assert time.monotonic() < deadline, "the applied profile does not relay"
            time.sleep(0.2)
    assert served.wait_for_message(ELSEWHERE) is not None


def test_discard_leaves_the_running_configuration_and_history_rolls_back(
    visitor: BrowserContext, served: Served, shots: Screenshots
) -> None:
    served.cli("domain", "add", "rolled.example")
    served.cli("config", "apply", "--comment", "a revision to roll back")
    running = served.cli("config", "export")
    page = log_in(visitor, "alice")

    page.goto("/domains")  # a change, then Discard: the running configuration is as it was
    served.cli("domain", "add", "discarded.example")
    page.reload()
    expect(page.locator("#pending")).to_have_text("1 pending change")
    page.locator("#pending").click()
    expect(page.locator("ul.diff")).to_contain_text("discarded.example")
    page.get_by_role("button", name="Discard").click()
    expect(page.get_by_text("No pending changes.")).to_be_visible()
    expect(page.locator("#pending")).to_have_text("0 pending changes")
    assert served.cli("config", "export") == running

    page.goto("/history")
    shots.take(page, "history")
    latest = page.locator("section.revision").first
    expect(latest).to_contain_text("a revision to roll back")
    expect(latest).to_contain_text("rolled.example")
    number = int((latest.get_attribute("id") or "").removeprefix("revision-"))
    page.get_by_role("button", name=f"Roll back to revision {number - 1}").click()
    expect(page).to_have_url(f"{served.url}/changes")
    expect(page.locator("#pending")).to_have_text("1 pending change")
    expect(page.locator("ul.diff")).to_contain_text("rolled.example")
    page.get_by_role("button", name="Discard").click()
    expect(page.get_by_text("No pending changes.")).to_be_visible()
    assert served.cli("config", "export") == running


# -- a connector's Verify, the queue ---------------------------------------------------


def test_verify_shows_each_step_against_a_smarthost_with_auth(
    visitor: BrowserContext, served: Served, certs: Certs, shots: Screenshots
) -> None:
    """The "isp" connector names a real Postfix (STARTTLS, SMTP AUTH) that
    relays to the sink; Verify shows every step, AUTH included."""
    postfix = Postfix(
        instance_directory(),
        served.postfix_port,
        ("127.0.0.1", served.sink_port),
        users={SMARTHOST_USER[0]: SMARTHOST_USER[1]},
        cert=certs.cert_file,
        key=certs.key_file,
    )
    postfix.start()
    try:
        page = log_in(visitor, "alice")
        page.goto("/connectors/isp")
        page.locator("#verify").get_by_role("button", name="Verify").click()
        steps = page.locator("#verify-steps li")
        expect(steps.first).to_be_visible()
        shown = steps.all_inner_texts()
        names = [text.split(":", 1)[0] for text in shown]
        assert names == ["target", "connect", "greeting", "EHLO", "STARTTLS", "AUTH"], shown
        assert all(": ok" in text for text in shown), shown
        expect(steps.last).to_contain_text(f"as {SMARTHOST_USER[0]}")
        shots.take(page, "connector-verify")
    finally:
        postfix.stop()


def test_a_deferred_message_is_held_released_and_deleted(
    visitor: BrowserContext, served: Served, shots: Screenshots
) -> None:
    served.send(DEFERRED)  # accepted (hosted), then deferred: nothing listens there
    page = log_in(visitor, "alice")
    page.goto("/queue?recipient=" + DEFERRED)
    row = page.locator("#messages tbody tr").filter(has_text=DEFERRED)
    expect(row).to_contain_text("(deferred", timeout=15_000)
    shots.take(page, "queue")
    row.get_by_role("link").click()
    expect(page.locator("#recipients")).to_contain_text("deferred")

    page.get_by_role("button", name="Hold").click()
    expect(page.locator("#recipients td.state-held")).to_have_text("held")
    page.get_by_role("button", name="Release").click()
    expect(page.locator("#recipients")).not_to_contain_text("held")
    page.get_by_role("button", name="Delete").click()
    expect(page).to_have_url(re.compile(r"/queue\?done="))
    page.goto("/queue?recipient=" + DEFERRED)
    expect(page.locator("#messages tbody")).to_contain_text("No message matches.")


# -- the admin listener's certificate --------------------------------------------------


def _with_certificate(tmp_path: Path, entry: dict[str, Any]) -> Any:
    document = merge(base_config(tmp_path, 2525), {"certificates": [{"name": "web", **entry}]})
    return parse_config(document)


def test_the_admin_certificate_may_be_pkcs12_with_a_pin(tmp_path: Path, certs: Certs) -> None:
    key = serialization.load_pem_private_key(certs.key_file.read_bytes(), None)
    chain = load_pem_x509_certificates(certs.cert_file.read_bytes())
    blob = pkcs12.serialize_key_and_certificates(
        b"web",
        key,  # type: ignore[arg-type]
        chain[0],
        chain[1:],
        serialization.BestAvailableEncryption(b"1234"),
    )
    p12, pin = tmp_path / "web.p12", tmp_path / "pin"
    p12.write_bytes(blob)
    pin.write_text("1234\n")
    for path in (p12, pin):
        path.chmod(0o600)
    config = _with_certificate(tmp_path, {"pkcs12": str(p12), "pin_file": str(pin)})
    context = admin_tls_context(config, tmp_path, "web")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match="no certificate named 'other'"):
        admin_tls_context(config, tmp_path, "other")


def test_admin_certificate_must_exist_and_plain_http_off_loopback_is_warned(
    tmp_path: Path, certs: Certs
) -> None:
    from smtpgate.config.validate import validate, warnings  # noqa: PLC0415

    pem = {"cert": str(certs.cert_file), "key": str(certs.key_file)}
    config = _with_certificate(tmp_path, pem)
    off = config.model_copy(
        update={"admin": config.admin.model_copy(update={"listen": "0.0.0.0:8025"})}
    )
    (warned,) = [w for w in warnings(off) if w.path == "admin.listen"]
    assert "plain HTTP off loopback" in warned.message
    assert "admin.certificate" in warned.message
    https = off.model_copy(update={"admin": off.admin.model_copy(update={"certificate": "web"})})
    assert not [w for w in warnings(https) if w.path == "admin.listen"]
    assert not [p for p in validate(https) if p.path.startswith("admin")]
    unknown = https.model_copy(
        update={"admin": https.admin.model_copy(update={"certificate": "nope"})}
    )
    assert [(p.path, p.message) for p in validate(unknown) if p.path.startswith("admin")] == [
        ("admin.certificate", "no certificate named 'nope'")
    ]
