"""Console page: named certificates.

The list shows what ``smtpgate certs list`` shows (subject, SANs, expiry, a
warning 30 days ahead), each certificate loaded on its own so that one broken
file does not hide the others. *Add certificate* takes an upload (PEM
certificate and key, or PKCS#12 with its PIN); *Create self-signed* makes a
first certificate with ``smtpgate.tls.certificates.self_signed``. Either way the
files are written under ``data_dir/certs/`` (0600), loaded once to check them
(the key belongs to the certificate, the PIN opens the file), and a
``certificates`` entry naming them goes to the draft. A PIN is encrypted with
the cluster's key, as ``/secrets/encrypt`` does.

Certificate files are read by every node from its own disk: a file written
here exists on this node only, and must be copied to the same path on every
peer before the draft is applied.
"""

import asyncio
import contextlib
import datetime as dt
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from cryptography.fernet import Fernet
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from smtpgate.admin import edit
from smtpgate.admin.console.app import Console, changer, viewer
from smtpgate.admin.console.pages.profiles import errors_under
from smtpgate.admin.console.sessions import Session
from smtpgate.admin.keys import encryption_key
from smtpgate.config.load import from_pydantic
from smtpgate.config.schema import Certificate, normalise_domain
from smtpgate.config.secret import encrypt, load_key
from smtpgate.errors import AdminError, ConfigError
from smtpgate.files import write_private
from smtpgate.tls import certificates

COLLECTION = "certificates"
MAX_DAYS = 3650
UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def file_stem(name: str) -> str:
    """A file name for certificate ``name``: its safe characters and a random
    suffix, so an upload never replaces another certificate's file."""
    return f"{UNSAFE.sub('_', name)[:60] or 'certificate'}-{secrets.token_hex(4)}"


def loaded_facts(
    items: list[dict[str, Any]], applied: set[str], data_dir: Path, now: dt.datetime
) -> list[dict[str, Any]]:
    """Each certificate entry with what ``certs list`` shows, or why it did not load."""
    key: list[Fernet] = []

    def pin_key() -> Fernet:
        if not key:
            key.append(load_key(data_dir, create=False))
        return key[0]

    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        row: dict[str, Any] = {"name": item.get("name", ""), "applied": item.get("name") in applied}
        row["files"] = [str(item[k]) for k in ("cert", "key", "pkcs12") if item.get(k)]
        try:
            cert = Certificate.model_validate(item, strict=False)
            row |= certificates.describe(
                certificates.load(cert, f"{COLLECTION}[{i}]", pin_key() if cert.pin else None),
                now,
            )
        except ConfigError as exc:
            row["error"] = "; ".join(p.message for p in exc.problems)
        except (ValidationError, ValueError, OSError) as exc:
            row["error"] = str(exc)
        out.append(row)
    return out


def routes(router: APIRouter, console: Console) -> None:  # noqa: PLR0915 - one page's routes
    """Register this page's routes."""
    see, change = viewer(console), changer(console)
    service = console.service

    def show(request: Request, session: Session, status: int = 200, **extra: Any) -> HTMLResponse:
        document = service.working()[0]
        try:
            applied = {c["name"] for c in service.applied().document.get(COLLECTION, [])}
        except AdminError:
            applied = set()
        now = dt.datetime.fromtimestamp(console.clock(), dt.UTC)
        rows = loaded_facts(edit.items(document, COLLECTION), applied, service.data_dir, now)
        context: dict[str, Any] = {
            "certificates": rows,
            "found": {},
            "form": "",
            "typed": {},
            "max_days": MAX_DAYS,
            "certs_dir": service.data_dir.resolve() / "certs",
        } | extra
        return console.render(request, "certificates.html", session, status, **context)

    def add(
        actor: str, name: str, files: dict[str, bytes], entry: Callable[[dict[str, Path]], Any]
    ) -> None:
        """Write ``files`` (suffix → data) under data_dir/certs, check the entry
        ``entry(paths)`` loads, and add it to the draft; on a problem the files go."""
        stem = file_stem(name)
        directory = service.data_dir.resolve() / "certs"
        paths = {suffix: directory / f"{stem}{suffix}" for suffix in files}
        written: list[Path] = []
        try:
            for suffix, data in files.items():
                write_private(paths[suffix], data)
                written.append(paths[suffix])
            item = entry(paths)
            index = len(edit.items(service.working()[0], COLLECTION))
            try:
                cert = Certificate.model_validate(item, strict=False)
            except ValidationError as exc:
                raise ConfigError(from_pydantic(exc, item)) from None
            key = encryption_key(service.store, service.data_dir) if cert.pin else None
            certificates.load(cert, f"{COLLECTION}[{index}]", key)
            service.edit(
                lambda d: edit.add_item(d, COLLECTION, item), actor, f"add certificate {name}"
            )
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise

    def failed(
        request: Request, session: Session, form: str, typed: dict[str, Any], exc: Exception
    ) -> HTMLResponse:
        if isinstance(exc, ConfigError):
            index = len(edit.items(service.working()[0], COLLECTION))
            found = errors_under(exc.problems, f"{COLLECTION}[{index}]")
            return show(request, session, 422, found=found, form=form, typed=typed)
        return show(request, session, 409, found={"name": [str(exc)]}, form=form, typed=typed)

    @router.get("/certificates", response_class=HTMLResponse)
    def listing(request: Request, session: Annotated[Session, Depends(see)]) -> HTMLResponse:
        return show(request, session)

    @router.post("/certificates/upload", response_class=HTMLResponse)
    async def upload(  # noqa: PLR0913, PLR0917 - the form's fields
        request: Request,
        session: Annotated[Session, Depends(change)],
        name: Annotated[str, Form(max_length=200)] = "",
        kind: Annotated[str, Form(max_length=20)] = "pem",
        cert: Annotated[UploadFile | None, File()] = None,
        key: Annotated[UploadFile | None, File()] = None,
        pkcs12: Annotated[UploadFile | None, File()] = None,
        pin: Annotated[str, Form(max_length=1024)] = "",
    ) -> Response:
        typed = {"name": name.strip(), "kind": kind}

        async def content(upload: UploadFile | None) -> bytes:
            return await upload.read() if upload is not None and upload.filename else b""

        found: dict[str, list[str]] = {}
        files: dict[str, bytes] = {}
        if kind == "pkcs12":
            files[".p12"] = await content(pkcs12)
            if not files[".p12"]:
                found["pkcs12"] = ["choose the PKCS#12 file (.p12 or .pfx)"]
        else:
            files[".pem"] = await content(cert)
            if not files[".pem"]:
                found["cert"] = ["choose the certificate's PEM file"]
            key_data = await content(key)
            if key_data:
                files[".key"] = key_data
        if not typed["name"]:
            found["name"] = ["enter a name for the certificate"]
        if found:
            return show(request, session, 422, found=found, form="upload", typed=typed)

        def entry(paths: dict[str, Path]) -> dict[str, Any]:
            item: dict[str, Any] = {"name": typed["name"]}
            if kind == "pkcs12":
                item["pkcs12"] = str(paths[".p12"])
                if pin:
                    secret = encrypt(encryption_key(service.store, service.data_dir), pin)
                    item["pin"] = secret
            else:
                item["cert"] = str(paths[".pem"])
                if ".key" in paths:
                    item["key"] = str(paths[".key"])
            return item

        try:
            await asyncio.to_thread(add, session.user.actor, typed["name"], files, entry)
        except (ConfigError, AdminError) as exc:
            return failed(request, session, "upload", typed, exc)
        return RedirectResponse("/certificates", status_code=303)

    @router.post("/certificates/self-signed", response_class=HTMLResponse)
    async def create(
        request: Request,
        session: Annotated[Session, Depends(change)],
        ss_name: Annotated[str, Form(max_length=200)] = "",
        host: Annotated[str, Form(max_length=300)] = "",
        days: Annotated[str, Form(max_length=10)] = "365",
    ) -> Response:
        typed = {"name": ss_name.strip(), "host": host.strip(), "days": days}
        found: dict[str, list[str]] = {}
        if not typed["name"]:
            found["name"] = ["enter a name for the certificate"]
        try:
            hostname = normalise_domain(typed["host"])
        except ValueError as exc:
            found["host"] = [str(exc)]
        number = int(days) if days.strip().isdigit() else 0
        if not 1 <= number <= MAX_DAYS:
            found["days"] = [f"a number of days from 1 to {MAX_DAYS}"]
        if found:
            return show(request, session, 422, found=found, form="self-signed", typed=typed)
        cert_pem, key_pem = await asyncio.to_thread(certificates.self_signed, hostname, number)

        def entry(paths: dict[str, Path]) -> dict[str, Any]:
            return {"name": typed["name"], "cert": str(paths[".pem"]), "key": str(paths[".key"])}

        files = {".pem": cert_pem, ".key": key_pem}
        try:
            await asyncio.to_thread(add, session.user.actor, typed["name"], files, entry)
        except (ConfigError, AdminError) as exc:
            return failed(request, session, "self-signed", typed, exc)
        return RedirectResponse("/certificates", status_code=303)

    @router.post("/certificates/remove", response_class=HTMLResponse)
    def remove(
        request: Request,
        session: Annotated[Session, Depends(change)],
        name: Annotated[str, Form(max_length=200)] = "",
    ) -> Response:
        try:
            service.edit(
                lambda d: edit.delete_item(d, COLLECTION, name),
                session.user.actor,
                f"delete certificate {name}",
            )
        except ConfigError as exc:
            reasons = "; ".join(str(p) for p in exc.problems)
            return show(request, session, 422, error=f"{name} was not removed: {reasons}")
        except AdminError as exc:
            return show(request, session, 409, error=f"{name} was not removed: {exc}")
        return RedirectResponse("/certificates", status_code=303)
