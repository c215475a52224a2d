"""MTA-STS (RFC 8461): discover, fetch, parse and cache a domain's policy.

* Discovery: the ``_mta-sts.DOMAIN`` TXT record (``v=STSv1; id=...``) through
  the gateway's one resolver; exactly one such record, else no policy.
* Fetch: ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` with httpx, the
  host resolved through the same resolver (the connection goes to its
  address, with SNI and ``Host:`` the policy host), the certificate verified
  against the system store and ``tls.ca_files``, no redirects (§3.3), at most
  64 KiB, within ``FETCH_TIMEOUT`` seconds, ``200`` and ``text/plain`` only.
* Cache: by id and ``max_age``, in memory and in ``data_dir/mta-sts/`` (one
  0600 JSON file per domain, node-local). A policy whose id is unchanged is
  not fetched again; while a cached policy is unexpired it stays in force
  even when the TXT record disappears or the fetch fails (§5.1).
  ``refresh`` (run in the background by the deliverer) fetches policies
  again before they expire and forgets expired ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from smtpgate.dns import Resolver
from smtpgate.files import FILE_MODE, private_dir
from smtpgate.observe.log import get_logger
from smtpgate.policy.transport import StsFact

log = get_logger("smtpgate.mtasts")

MAX_POLICY = 64 * 1024  # RFC 8461 §3.3: senders may limit the size; 64 KiB is plenty
FETCH_TIMEOUT = 15.0
MAX_AGE_LIMIT = 31_557_600  # one year (§3.2)
FAILED_RETRY = 300.0  # a failed fetch is not tried again for this long (seconds)
MAX_DOMAINS = 10_000  # policies kept in memory
REFRESH_AHEAD = 86_400.0  # refresh policies that expire within a day
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_FILE_NAME = re.compile(r"^[a-z0-9._-]{1,253}$")


class StsError(Exception):
    """A policy could not be used; ``kind`` is its TLSRPT result type."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


def parse_record(texts: list[str]) -> str | None:
    """The policy id of the one ``v=STSv1`` TXT record, or None (§3.1)."""
    found = [t for t in texts if t.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = dict(part.strip().partition("=")[::2] for part in found[0].split(";") if part.strip())
    ident = fields.get("id", "")
    return ident if fields.get("v") == "STSv1" and _ID.match(ident) else None


def parse_policy(text: str, ident: str) -> StsFact:
    """A policy document (§3.2); raises ``StsError`` when it is not valid."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    values: dict[str, list[str]] = {}
    for line in lines:
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise StsError("sts-policy-invalid", f"not a key: value line: {line[:80]!r}")
        values.setdefault(key.strip(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise StsError("sts-policy-invalid", "version is not STSv1")
    mode = (values.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise StsError("sts-policy-invalid", f"unknown mode {mode!r}")
    age = (values.get("max_age") or [""])[0]
    if not age.isdigit() or len(age) > 10:
        raise StsError("sts-policy-invalid", "max_age is not a number")
    mx = tuple(m.lower().rstrip(".") for m in values.get("mx", []))
    if mode != "none" and not mx:
        raise StsError("sts-policy-invalid", "no mx in an enforce or testing policy")
    kept = tuple(line for line in lines if line.strip())
    return StsFact(mode, mx, ident, min(int(age), MAX_AGE_LIMIT), kept)  # type: ignore[arg-type]


@dataclass
class _Entry:
    fact: StsFact
    fetched: float  # wall clock

    def fresh(self, now: float) -> bool:
        return now < self.fetched + self.fact.max_age


class StsCache:
    """Policies by domain (see the module's docstring)."""

    def __init__(
        self,
        resolver: Resolver,
        directory: Path | None,  # None: in memory only (``policy explain``)
        *,
        port: int = 443,
        ca_files: tuple[str, ...] = (),
        quiet: bool = False,  # no log lines (the CLI's --json output stays clean)
    ) -> None:
        self.resolver = resolver
        self.quiet = quiet
        self.directory = directory
        self.port = port
        self.ca_files = ca_files
        self._entries: dict[str, _Entry] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # domain → (when, TLSRPT kind)
        self._inflight: dict[str, asyncio.Task[tuple[StsFact | None, str | None]]] = {}

    async def lookup(self, domain: str) -> tuple[StsFact | None, str | None]:
        """The policy in force for ``domain`` and, when none could be had although
        one is published, the TLSRPT failure type."""
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.ensure_future(self._lookup(domain))
            self._inflight[domain] = task
            task.add_done_callback(lambda _: self._inflight.pop(domain, None))
        return await asyncio.shield(task)

    async def _lookup(self, domain: str) -> tuple[StsFact | None, str | None]:
        now = time.time()
        cached = self._cached(domain, now)
        record = await self.resolver.records(f"_mta-sts.{domain}", "TXT")
        ident = parse_record(record.values) if record.status == "ok" else None
        if ident is None:
            return (cached.fact if cached else None), None
        if cached is not None and cached.fact.id == ident:
            return cached.fact, None
        failed = self._failed.get(domain)
        if failed is not None and now - failed[0] < FAILED_RETRY:
            return (cached.fact if cached else None), (None if cached else failed[1])
        try:
            fact = await self.fetch(domain, ident)
        except StsError as exc:
            if not self.quiet:
                log.info("MTA-STS policy unusable", domain=domain, kind=exc.kind, error=str(exc))
            if len(self._failed) >= MAX_DOMAINS:
                self._failed = {d: f for d, f in self._failed.items() if now - f[0] < FAILED_RETRY}
                if len(self._failed) >= MAX_DOMAINS:
                    self._failed.clear()
            self._failed[domain] = (now, exc.kind)
            return (cached.fact if cached else None), (None if cached else exc.kind)
        self._failed.pop(domain, None)
        self._store(domain, _Entry(fact, now))
        if not self.quiet:
            log.info("MTA-STS policy fetched", domain=domain, id=ident, mode=fact.mode)
        return fact, None

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for path in self.ca_files:
            context.load_verify_locations(cafile=path)
        return context

    async def fetch(self, domain: str, ident: str) -> StsFact:
        """Fetch and parse the policy of ``domain`` (raises ``StsError``)."""
        host = f"mta-sts.{domain}"
        addresses = await self.resolver.addresses(host)
        if not addresses:
            raise StsError("sts-policy-fetch-error", f"{host} has no address")
        last = ""
        for address in addresses:
            literal = f"[{address}]" if ":" in address else address
            url = f"https://{literal}:{self.port}/.well-known/mta-sts.txt"
            try:
                text = await self._get(url, host)
            except ssl.SSLError as exc:
                raise StsError("sts-webpki-invalid", f"{host}: {exc}") from exc
            except (httpx.HTTPError, OSError) as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise StsError("sts-webpki-invalid", f"{host}: {exc}") from exc
                last = f"{host}[{address}]: {exc!r}"
                continue
            return parse_policy(text, ident)
        raise StsError("sts-policy-fetch-error", last)

    async def _get(self, url: str, host: str) -> str:
        async with (
            asyncio.timeout(FETCH_TIMEOUT),
            httpx.AsyncClient(
                verify=self._context(), follow_redirects=False, timeout=FETCH_TIMEOUT
            ) as client,
            client.stream(
                "GET", url, headers={"Host": host}, extensions={"sni_hostname": host}
            ) as response,
        ):
            if response.status_code != 200:
                raise StsError(
                    "sts-policy-fetch-error", f"{host} answered HTTP {response.status_code}"
                )
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "text/plain":
                raise StsError("sts-policy-invalid", f"{host} served {kind or 'no type'}")
            body = b""
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_POLICY:
                    raise StsError("sts-policy-invalid", f"{host}: policy over {MAX_POLICY} bytes")
            return body.decode("utf-8", "replace")

    # -- the cache -------------------------------------------------------------------

    def _path(self, domain: str) -> Path | None:
        if self.directory is None or not _FILE_NAME.match(domain):
            return None
        return self.directory / f"{domain}.json"

    def _cached(self, domain: str, now: float) -> _Entry | None:
        entry = self._entries.get(domain) or self._read(domain)
        if entry is None or not entry.fresh(now):
            return None
        self._entries[domain] = entry
        return entry

    def _read(self, domain: str) -> _Entry | None:
        path = self._path(domain)
        if path is None or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            fact = parse_policy("\n".join(saved["text"]), saved["id"])
            return _Entry(fact, float(saved["fetched"]))
        except (OSError, ValueError, KeyError, TypeError, StsError):
            return None

    def _store(self, domain: str, entry: _Entry) -> None:
        if len(self._entries) >= MAX_DOMAINS:
            oldest = min(self._entries, key=lambda d: self._entries[d].fetched)
            del self._entries[oldest]
        self._entries[domain] = entry
        path = self._path(domain)
        if path is None or self.directory is None:
            return
        saved = {"id": entry.fact.id, "text": list(entry.fact.text), "fetched": entry.fetched}
        try:
            private_dir(self.directory)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")  # workers write at once
            temporary.write_text(json.dumps(saved), encoding="utf-8")
            temporary.chmod(FILE_MODE)
            temporary.replace(path)
        except OSError as exc:
            log.warning("MTA-STS policy not saved", domain=domain, error=str(exc))

    def domains(self) -> list[str]:
        """The domains with a saved policy."""
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json"))

    async def refresh(self) -> None:
        """Fetch policies that expire within a day again; forget expired ones."""
        now = time.time()
        for domain in self.domains():
            entry = self._entries.get(domain) or self._read(domain)
            if entry is None or not entry.fresh(now):
                self._entries.pop(domain, None)
                path = self._path(domain)
                if path is not None:
                    path.unlink(missing_ok=True)
                continue
            if entry.fetched + entry.fact.max_age - now < REFRESH_AHEAD:
                self._entries.pop(domain, None)
                with contextlib.suppress(Exception):
                    # an unchanged id keeps the policy: fetch it again to renew it
                    fact = await self.fetch(domain, entry.fact.id)
                    self._store(domain, _Entry(fact, now))

    async def run_refresh(self, interval: float = 3600.0) -> None:
        """The background refresh, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("MTA-STS refresh failed", error=str(exc))
