"""The console's hosted domains, listeners, TLS and certificates pages, in process."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from smtpgate.admin.services import ConfigService
from smtpgate.tls.certificates import self_signed
from tests.integration import test_console_profiles as shared

# The fixtures and helpers of the profile pages' tests: the same gateway and users.
service, admin, auditor = shared.service, shared.admin, shared.auditor
error_next_to, post = shared.error_next_to, shared.post

# -- hosted domains ---------------------------------------------------------------------


def test_domain_add_and_remove(service: ConfigService, admin: TestClient) -> None:
    response = post(admin, "/domains", {"domain": "Bücher.Example"})
    assert response.status_code == 303
    assert service.working()[0]["hosted_domains"] == ["example.com", "xn--bcher-kva.example"]
    html = admin.get("/domains").text
    assert "xn--bcher-kva.example" in html
    assert "1 pending change" in html

    response = post(admin, "/domains/remove", {"domain": "example.com"})
    assert response.status_code == 303
    assert service.working()[0]["hosted_domains"] == ["xn--bcher-kva.example"]


def test_a_bad_domain_is_shown_under_the_field(service: ConfigService, admin: TestClient) -> None:
    response = post(admin, "/domains", {"domain": "bad..example"})
    assert response.status_code == 422
    assert "is not a domain name" in error_next_to(response.text, "domain")
    assert service.store.draft() is None

    response = post(admin, "/domains", {"domain": "EXAMPLE.com"})
    assert response.status_code == 409
    assert "a hosted domain already" in error_next_to(response.text, "domain")


def test_an_auditor_cannot_change_domains(service: ConfigService, auditor: TestClient) -> None:
    html = auditor.get("/domains").text
    assert "example.com" in html
    assert 'action="/domains' not in html
    assert post(auditor, "/domains", {"domain": "other.example"}).status_code == 403
    assert service.store.draft() is None


# -- listeners ---------------------------------------------------------------------------


def test_listeners_are_read_only_and_node_local(admin: TestClient) -> None:
    html = admin.get("/listeners").text
    assert "127.0.0.1:2525" in html
    assert "node-local" in html
    assert "restarts" in html
    assert '<form method="post" action="/listeners' not in html


# -- TLS ----------------------------------------------------------------------------------


def test_tls_form(service: ConfigService, admin: TestClient) -> None:
    html = admin.get("/tls").text
    assert 'value="TLSv1.3" checked' in html
    form = {
        "opportunistic": "false",
        "protocols": ["TLSv1.3"],
        "cipher_strength": "medium",
        "ca_files": "",
    }
    assert post(admin, "/tls", form).status_code == 303
    tls = service.working()[0]["tls"]
    assert tls["opportunistic"] is False
    assert tls["protocols"] == ["TLSv1.3"]
    assert tls["cipher_strength"] == "medium"

    response = post(admin, "/tls", {**form, "protocols": ["TLSv1", "TLSv1.3"]})
    assert response.status_code == 422
    assert "protocols must be a contiguous range" in response.text
    assert service.working()[0]["tls"]["protocols"] == ["TLSv1.3"]


def test_an_auditor_sees_the_tls_settings_without_a_form(auditor: TestClient) -> None:
    html = auditor.get("/tls").text
    assert "TLSv1.2, TLSv1.3" in html
    assert 'action="/tls"' not in html


# -- certificates -------------------------------------------------------------------------


def certificates_of(service: ConfigService) -> list[dict[str, object]]:
    found: list[dict[str, object]] = service.working()[0]["certificates"]
    return found


def test_a_self_signed_certificate_appears_in_the_list(
    service: ConfigService, admin: TestClient
) -> None:
    form = {"ss_name": "mx", "host": "mx.example.com", "days": "90"}
    response = post(admin, "/certificates/self-signed", form)
    assert response.status_code == 303, response.text
    [entry] = certificates_of(service)
    assert entry["name"] == "mx"
    cert, key = Path(str(entry["cert"])), Path(str(entry["key"]))
    assert cert.parent == (service.data_dir / "certs").resolve()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    html = admin.get("/certificates").text
    assert "CN=mx.example.com" in html
    assert "not applied yet" in html
    assert "same path on every peer" in html
    assert "expires within 30 days" not in html


def test_self_signed_form_errors_are_under_their_fields(
    service: ConfigService, admin: TestClient
) -> None:
    form = {"ss_name": "mx", "host": "bad..host", "days": "0"}
    response = post(admin, "/certificates/self-signed", form)
    assert response.status_code == 422
    assert "is not a domain name" in error_next_to(response.text, "host")
    assert "a number of days from 1 to 3650" in error_next_to(response.text, "days")
    assert certificates_of(service) == []


def test_a_short_lived_certificate_is_flagged(service: ConfigService, admin: TestClient) -> None:
    form = {"ss_name": "soon", "host": "mx.example.com", "days": "10"}
    assert post(admin, "/certificates/self-signed", form).status_code == 303
    assert "expires within 30 days" in admin.get("/certificates").text


def test_upload_pem(service: ConfigService, admin: TestClient) -> None:
    cert_pem, key_pem = self_signed("upload.example.com", 365)
    files = {"cert": ("mx.pem", cert_pem), "key": ("mx.key", key_pem)}
    response = post(admin, "/certificates/upload", {"name": "up", "kind": "pem"}, files=files)
    assert response.status_code == 303, response.text
    [entry] = certificates_of(service)
    assert Path(str(entry["cert"])).read_bytes() == cert_pem
    assert stat.S_IMODE(Path(str(entry["key"])).stat().st_mode) == 0o600
    html = admin.get("/certificates").text
    assert "CN=upload.example.com" in html
    assert "upload.example.com" in html

    response = post(admin, "/certificates/upload", {"name": "up", "kind": "pem"}, files=files)
    assert response.status_code == 409
    assert "exists already" in error_next_to(response.text, "name")


def test_a_key_of_another_certificate_is_refused(service: ConfigService, admin: TestClient) -> None:
    cert_pem, _key = self_signed("one.example.com", 365)
    _cert, other_key = self_signed("two.example.com", 365)
    files = {"cert": ("c.pem", cert_pem), "key": ("k.pem", other_key)}
    response = post(admin, "/certificates/upload", {"name": "bad", "kind": "pem"}, files=files)
    assert response.status_code == 422
    assert "does not belong to the certificate" in error_next_to(response.text, "key")
    assert certificates_of(service) == []
    certs = service.data_dir / "certs"
    assert not certs.exists() or list(certs.iterdir()) == []


def pkcs12_file(pin: bytes) -> bytes:
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p12.example.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=100))
        .sign(private, hashes.SHA256())
    )
    encryption = serialization.BestAvailableEncryption(pin)
    return pkcs12.serialize_key_and_certificates(b"p12", private, cert, None, encryption)


def test_upload_pkcs12_with_its_pin_encrypted(service: ConfigService, admin: TestClient) -> None:
    data = pkcs12_file(b"1234")
    files = {"pkcs12": ("id.p12", data)}
    form = {"name": "p12", "kind": "pkcs12", "pin": "4321"}
    response = post(admin, "/certificates/upload", form, files=files)
    assert response.status_code == 422
    assert "the PIN does not open" in error_next_to(response.text, "pin")

    response = post(admin, "/certificates/upload", {**form, "pin": "1234"}, files=files)
    assert response.status_code == 303, response.text
    [entry] = certificates_of(service)
    assert str(entry["pin"]).startswith("enc:v1:")
    html = admin.get("/certificates").text
    assert "CN=p12.example.com" in html
    assert "1234" not in html


def test_an_auditor_cannot_add_certificates(service: ConfigService, auditor: TestClient) -> None:
    assert 'action="/certificates' not in auditor.get("/certificates").text
    form = {"ss_name": "mx", "host": "mx.example.com", "days": "90"}
    assert post(auditor, "/certificates/self-signed", form).status_code == 403
    assert certificates_of(service) == []
