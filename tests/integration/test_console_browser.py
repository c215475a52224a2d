"""The web console in a real browser (Debian's chromium, Playwright's sync API)
against a real ``smtpgate serve`` whose admin listener serves HTTPS, with a
real recording sink. Each test asserts what the administrator sees.

One gateway and one browser for the whole module; each test opens its own
browser context (its own cookies). See ``tests/browser.py``.
"""

from __future__ import annotations

import ssl
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
    PASSWORDS,
    VIEWPORT,
    Screenshots,
    Served,
    chromium,
    serve_console,
)
from tests.conftest import Certs, base_config, merge


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
