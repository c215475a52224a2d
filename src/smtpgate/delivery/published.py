"""What a recipient domain publishes about transport security, gathered for one
direct delivery: its MTA-STS policy (``mtasts.py``) and each MX host's TLSA
records (``dane.py``), as the ``DomainFacts`` that ``policy/transport.py``
turns into the requirement for each host. Also records each TLS session's
outcome for TLS reporting (``tlsrpt.py``) when that is enabled.

Held by the deliverer for the life of the process; the MTA-STS cache is
refreshed in the background while the gateway runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import ssl
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from smtpgate.config.schema import GatewayConfig
from smtpgate.delivery.dane import peer_chain, tlsa_fact, verify_dane
from smtpgate.delivery.mtasts import StsCache
from smtpgate.delivery.targets import Target
from smtpgate.delivery.tlsrpt import KEEP_DAYS, SessionRecorder, Submit, send_reports, utc_day
from smtpgate.dns import DnsResolver, Resolver
from smtpgate.model.domain import normalise_domain
from smtpgate.observe.log import get_logger
from smtpgate.policy.tls import OutboundPolicy
from smtpgate.policy.transport import DaneFact, DomainFacts, mx_matches
from smtpgate.tls.certificates import certificate_matches

log = get_logger("smtpgate.delivery")


@dataclass(frozen=True)
class Check:
    """One TLS session against what the domain published."""

    failure: str | None = None  # the TLSRPT result type; None: success
    text: str = ""  # why, for the reply and the log
    verified_by: str = ""  # "dane" or "mta-sts" when that authenticated the server
    enforced: bool = False  # the failure defers the delivery


@functools.lru_cache(maxsize=4)
def _store(ca_files: tuple[str, ...]) -> Store:
    paths = [ssl.get_default_verify_paths().cafile or "", *ca_files]
    anchors: list[x509.Certificate] = []
    for path in paths:
        with contextlib.suppress(OSError, ValueError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old roots with odd serial numbers
            anchors += x509.load_pem_x509_certificates(Path(path).read_bytes())
    return Store(anchors)


def webpki_problem(chain: list[bytes], host: str, ca_files: tuple[str, ...]) -> str | None:
    """Why ``chain`` is not WebPKI-valid for ``host`` (system store and ``ca_files``),
    as a TLSRPT result type; None when it is."""
    if not chain:
        return "certificate-not-trusted"
    certs = [x509.load_der_x509_certificate(der) for der in chain]
    if not certificate_matches(chain[0], (host,)):
        return "certificate-host-mismatch"
    if certs[0].not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        return "certificate-expired"
    try:
        # The chain and the name as the WebPKI has them; the leaf's other extensions
        # as OpenSSL takes them (it is OpenSSL that validates in enforce mode).
        leaf = ExtensionPolicy.permit_all().require_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )
        verifier = (
            PolicyBuilder()
            .store(_store(ca_files))
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf)
            .build_server_verifier(x509.DNSName(host))
        )
        verifier.verify(certs[0], certs[1:])
    except (VerificationError, ValueError):
        return "certificate-not-trusted"
    return None


def check_session(
    facts: DomainFacts | None,
    policy: OutboundPolicy,
    host: str,
    ssl_object: ssl.SSLObject | None,
    ca_files: tuple[str, ...] = (),
) -> Check:
    """The session on an open connection (after STARTTLS, if any) against DANE or
    MTA-STS: what failed, whether that defers, and what authenticated the server."""
    if policy.tlsa:
        if ssl_object is None:
            return Check(
                "dane-required", f"4.7.5 {host} offers no STARTTLS, and DANE requires TLS", "", True
            )
        ok, how = verify_dane(peer_chain(ssl_object), policy.tlsa, (host,))
        if not ok:
            return Check("tlsa-invalid", f"4.7.5 DANE: {how} of {host}", "", True)
        return Check(None, how, "dane")
    if policy.published != "sts" or facts is None:
        return Check() if ssl_object is not None else Check("starttls-not-supported")
    sts = facts.sts
    enforce = not policy.testing
    if sts is not None and not any(mx_matches(p, host) for p in sts.mx):
        return Check(
            "validation-failure", f"4.7.5 {host} is not in the MTA-STS policy", "", enforce
        )
    if ssl_object is None:
        return Check(
            "starttls-not-supported", f"4.7.5 {host} offers no STARTTLS (MTA-STS)", "", enforce
        )
    problem = webpki_problem(peer_chain(ssl_object), host, ca_files)
    if problem is not None:
        return Check(problem, f"4.7.5 MTA-STS: {problem} at {host}", "", enforce)
    return Check(None, "", "mta-sts")


class Published:
    """MTA-STS policies, TLSA facts and the TLS session record of one gateway."""

    def __init__(
        self,
        resolver: Resolver,
        config: GatewayConfig,
        submit: Submit | None = None,
        *,
        daily: bool = True,
    ) -> None:
        self.daily = daily  # this process sends the daily TLS reports
        data_dir = Path(config.gateway.data_dir)
        self.resolver = resolver
        self.sts = StsCache(
            resolver,
            data_dir / "mta-sts",
            port=config.outbound_security.mta_sts_port,
            ca_files=tuple(str(p) for p in config.tls.ca_files),
        )
        self.recorder = SessionRecorder(data_dir / "tlsrpt.db")
        self.submit = submit
        self._refresh: asyncio.Task[None] | None = None
        self._daily: asyncio.Task[None] | None = None
        self._config = config

    def _configure(self, config: GatewayConfig) -> None:
        """Follow the current configuration (port and CA files may change)."""
        self._config = config
        self.sts.port = config.outbound_security.mta_sts_port
        self.sts.ca_files = tuple(str(p) for p in config.tls.ca_files)
        if self._refresh is None and config.outbound_security.mta_sts:
            self._refresh = asyncio.get_running_loop().create_task(self.sts.run_refresh())
        if self._daily is None and self.daily and config.outbound_security.tlsrpt.enabled:
            self._daily = asyncio.get_running_loop().create_task(self._run_daily())

    async def send_reports(self, day: str | None = None) -> list[str]:
        """Send the TLS reports of ``day`` (default: yesterday, UTC) not yet sent."""
        config = self._config
        settings = config.outbound_security.tlsrpt
        hostname = config.gateway.hostname
        return await send_reports(
            self.recorder,
            self.resolver,
            day or utc_day(time.time() - 86_400),
            organization=settings.organization,
            contact=settings.contact,
            submitter=hostname,
            sender=config.gateway.admin_address or f"postmaster@{hostname}",
            submit=self.submit,
            ca_files=tuple(str(p) for p in config.tls.ca_files),
        )

    async def _run_daily(self) -> None:
        """Yesterday's reports, checked hourly (sent once); old days forgotten."""
        while True:
            try:
                await self.send_reports()
                self.recorder.forget_before(utc_day(time.time() - KEEP_DAYS * 86_400))
            except Exception as exc:
                log.warning("TLS reports failed", error=str(exc))
            await asyncio.sleep(3600)

    async def facts(
        self, config: GatewayConfig, domain: str, targets: Sequence[Target]
    ) -> DomainFacts:
        """The domain's MTA-STS policy and each MX host's DANE facts."""
        self._configure(config)
        settings = config.outbound_security
        wants_sts = settings.mta_sts or any(d.domain == domain for d in settings.domains)
        sts, error = (await self.sts.lookup(domain)) if wants_sts else (None, None)
        dane: dict[str, DaneFact] = {}
        if settings.dane:
            hosts = list(dict.fromkeys((t.host, t.port, t.secure) for t in targets))
            found = await asyncio.gather(
                *(tlsa_fact(self.resolver, secure, host, port) for host, port, secure in hosts)
            )
            dane = {host: fact for (host, _, _), fact in zip(hosts, found, strict=True)}
        return DomainFacts(domain, sts, error, dane, tuple(dict.fromkeys(t.host for t in targets)))

    def record(  # noqa: PLR0913, PLR0917 - one session's outcome and where it belongs
        self,
        config: GatewayConfig,
        facts: DomainFacts | None,
        policy: OutboundPolicy,
        host: str,
        address: str,
        failure: str | None,
        detail: str = "",
    ) -> None:
        """One TLS session's outcome (``failure`` None: success), for TLSRPT."""
        if facts is None or not config.outbound_security.tlsrpt.enabled:
            return
        self.recorder.record(facts, policy, host, address, failure, detail)

    async def close(self) -> None:
        for task in (self._refresh, self._daily):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresh = self._daily = None
        self.recorder.close()


async def lookup_published(config: GatewayConfig, domains: Sequence[str]) -> dict[str, DomainFacts]:
    """The facts of ``domains`` for ``policy explain --lookup`` and ``connector verify``:
    looked up now with ``gateway.dns``, nothing cached or written."""
    settings = config.outbound_security
    resolver = DnsResolver(config.gateway.dns)
    sts = StsCache(
        resolver,
        None,
        port=settings.mta_sts_port,
        ca_files=tuple(str(p) for p in config.tls.ca_files),
        quiet=True,
    )
    port = next((c.deliver.dns.port for c in config.send_connectors if c.deliver.dns), 25)
    found: dict[str, DomainFacts] = {}
    for domain in dict.fromkeys(domains):
        try:
            domain = normalise_domain(domain)  # noqa: PLW2901 - the normal form is the key
        except ValueError:
            continue
        answer = await resolver.mx(domain)
        hosts = tuple(host for _, host in answer.hosts)
        wants_sts = settings.mta_sts or any(d.domain == domain for d in settings.domains)
        policy, error = (await sts.lookup(domain)) if wants_sts else (None, None)
        dane: dict[str, DaneFact] = {}
        if settings.dane:
            for host in hosts:
                dane[host] = await tlsa_fact(resolver, answer.secure, host, port)
        found[domain] = DomainFacts(domain, policy, error, dane, hosts)
    return found
