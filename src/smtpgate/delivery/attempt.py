"""One delivery attempt: connect, secure, authenticate, send, per-recipient outcomes.

An attempt decides nothing about policy and nothing about retries: it
reports, for each recipient, the reply it got (or that it got none). Rules
kept here:

* Targets (``targets.py``): the connector's smarthost, or the MX hosts of
  the recipient domain, all resolved with the gateway's resolver. Several
  addresses per host and IPv6 are tried in turn.
* A target that cannot be reached, or whose greeting is not 220, makes way
  for the next; once a server has greeted us its replies are final for
  this attempt.
* ``require-starttls`` and ``implicit-tls`` never fall back to plaintext: a
  server without STARTTLS or a failed handshake defers (4.7.5).
  Opportunistic ``starttls`` uses TLS when offered.
* Smarthost AUTH (PLAIN) only over TLS, unless the connector's security is
  explicitly ``none`` (which ``config check`` warns about).
* The conversation itself (pipelining, DSN parameters, the body, each
  recipient's reply) is the sans-IO core's (``smtpgate.proto.client`` and
  ``smtpgate.proto.transaction``); this module drives it.
* Direct delivery honours what the recipient domain publishes: DANE, then
  MTA-STS (``published.py``, decided by ``policy/transport.py``); a host
  that fails them defers (4.7.5), never plaintext; each session's outcome
  is counted for TLS reporting.
* Idle connections are kept ``connection_cache_time`` seconds for the next
  message to the same destination (checked with RSET before reuse).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from smtpgate.config.schema import SendConnector, Timeouts
from smtpgate.delivery.client import SmtpClient
from smtpgate.delivery.published import Published, check_session
from smtpgate.delivery.targets import NoTarget, Target, resolve_targets
from smtpgate.delivery.tlsrpt import Submit
from smtpgate.dns import Resolver
from smtpgate.errors import DeliveryError
from smtpgate.model.envelope import MailParams, Recipient
from smtpgate.observe.log import get_logger
from smtpgate.policy.tls import OutboundPolicy
from smtpgate.policy.transport import DomainFacts, secure_policy
from smtpgate.snapshot import Snapshot
from smtpgate.spool import Body
from smtpgate.tls.certificates import certificate_matches
from smtpgate.tls.context import client_context

log = get_logger("smtpgate.delivery")
MAX_DOMAIN_FACTS = 1000


@dataclass(frozen=True)
class Outcome:
    idx: int
    code: int | None  # None: no reply (unreachable, connection lost, TLS impossible)
    text: str


@dataclass(frozen=True)
class AttemptReport:
    outcomes: list[Outcome]
    reached: bool  # some server greeted us (if not, a failover connector may try)
    tls: str | None = None
    remote: str | None = None
    dsn_passed_on: bool = False  # the next hop offered DSN and took the parameters
    connection_lost: bool = False  # no reply at all on an open connection
    verified: bool = False  # the next hop's certificate was validated (chain and name)
    verified_by: str = ""  # "dane" or "mta-sts" when the recipient domain's policy did it
    reusable: bool = True  # the connection is back between transactions
    relay: str | None = None  # "host[address]:port" of the server that answered
    transmit: float = 0.0  # seconds of the mail transaction (MAIL to the end of data)
    waited: float = 0.0  # seconds waiting for a delivery slot (set by the queue manager)
    took: float = 0.0  # seconds of the whole attempt (set by the queue manager)


@dataclass(frozen=True)
class Job:
    connector: SendConnector
    sender: str
    params: MailParams
    recipients: list[tuple[int, Recipient]]
    body: Body
    domain: str  # the recipients' domain (for direct delivery)
    snapshot: Snapshot  # the configuration this attempt runs under


class _TlsFellThrough(Exception):  # noqa: N818 - a signal to retry without TLS, not an error
    """Opportunistic STARTTLS failed: retry the same host without TLS."""


def _names_ok(client: SmtpClient, policy: OutboundPolicy) -> bool:
    ssl_object = client.writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der is not None and certificate_matches(der, policy.names)


def _all(job: Job, code: int | None, text: str) -> list[Outcome]:
    return [Outcome(idx, code, text) for idx, _ in job.recipients]


def _relay(client: SmtpClient, host: str) -> str:
    """Postfix's ``relay=``: the name, the address and the port."""
    return f"{host}[{client.peer_address}]:{client.peer_port}"


@dataclass
class _Cached:
    client: SmtpClient
    handle: asyncio.TimerHandle


# A kept connection serves only mail with the same TLS requirement to the same host
# name: one opened for opportunistic TLS (or verified for another name) must never
# carry mail whose profile demands a validated certificate.
CacheKey = tuple[str, str, int, str, tuple[object, ...]]


def cache_key(
    connector: str, address: str, port: int, host: str, policy: OutboundPolicy
) -> CacheKey:
    requirement = (policy.mandatory, policy.validate, policy.names, policy.minimum)
    return (connector, address, port, host, (*requirement, policy.strength))


@dataclass
class Deliverer:
    """Runs attempts; owns the cache of idle connections."""

    hostname: str
    timeouts: Timeouts
    resolver: Resolver
    cache_time: float = 5.0
    # transactions on one connection before it is closed (0: no limit; queue/shaping.py)
    per_connection: Callable[[Job], int] = lambda _job: 0
    _cache: dict[CacheKey, list[_Cached]] = field(default_factory=dict)
    _closing: set[asyncio.Task[None]] = field(default_factory=set)
    report_submit: Submit | None = None  # queues TLS reports (set by the composition root)
    daily_reports: bool = True  # sends the daily TLS reports (one worker of several does)
    _published: Published | None = None
    _facts: dict[str, DomainFacts] = field(default_factory=dict)  # the last, by domain

    def _close_later(self, client: SmtpClient) -> None:
        task = asyncio.get_running_loop().create_task(client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def attempt(self, job: Job) -> AttemptReport:
        targets = await self._targets(job)
        if isinstance(targets, AttemptReport):
            return targets
        facts = await self._domain_facts(job, targets)
        last = "no address to connect to"
        refused: str | None = None
        for target in targets:
            host, address, port = target.host, target.address, target.port
            policy = self.policy(job, host, facts)
            if policy.refusal is not None:
                refused = last = policy.refusal
                self._record(job, policy, host, address, "validation-failure", policy.refusal)
                continue
            # a kept connection was checked against another domain's policy, if any: never
            # for mail that this domain's DANE or MTA-STS enforce protects
            protected = policy.published == "tlsa" or (
                policy.published == "sts" and not policy.testing
            )
            key = cache_key(job.connector.name, address, port, host, policy)
            cached = None if protected else await self._cached(key)
            if cached is not None:
                report = await self._on(cached, job, host, policy, fresh=False)
                if report is not None and not report.connection_lost:
                    return report
            try:
                client = await self._connect(job, host, address, port, policy)
            except DeliveryError as exc:
                last = str(exc)
                continue
            try:
                report = await self._on(client, job, host, policy, fresh=True)
            except _TlsFellThrough as failed:
                log.info("opportunistic TLS failed, retrying without", host=host, error=str(failed))
                report = await self._plaintext(job, host, address, port, policy)
            if report is None or not report.reached:
                greeted = f" ({report.remote})" if report and report.remote else ""
                last = f"{host} did not greet with 220{greeted}"
                continue
            return report
        if refused is not None and last == refused:
            return AttemptReport(_all(job, None, refused), reached=False)
        return AttemptReport(_all(job, None, f"4.4.1 unreachable: {last}"), reached=False)

    async def _targets(self, job: Job) -> list[Target] | AttemptReport:
        found = await resolve_targets(self.resolver, job.connector.deliver, job.domain)
        if isinstance(found, NoTarget):
            return AttemptReport(_all(job, found.code, found.text), reached=found.reached)
        return found

    async def _domain_facts(self, job: Job, targets: list[Target]) -> DomainFacts | None:
        """What the recipient domain publishes (direct delivery only)."""
        config = job.snapshot.config
        wanted = config.outbound_security
        if job.connector.deliver.dns is None or not (
            wanted.mta_sts or wanted.dane or wanted.domains or wanted.tlsrpt.enabled
        ):
            return None
        if self._published is None:
            self._published = Published(
                self.resolver, config, self.report_submit, daily=self.daily_reports
            )
        facts = await self._published.facts(config, job.domain, targets)
        self._facts.pop(job.domain, None)
        if len(self._facts) >= MAX_DOMAIN_FACTS:  # only running attempts need theirs
            self._facts.pop(next(iter(self._facts)))
        self._facts[job.domain] = facts
        return facts

    def _record(  # noqa: PLR0913, PLR0917 - one session's outcome for TLS reporting
        self,
        job: Job,
        policy: OutboundPolicy,
        host: str,
        address: str,
        failure: str | None,
        detail: str = "",
    ) -> None:
        facts = self._facts.get(job.domain) if job.connector.deliver.dns else None
        if self._published is not None:
            self._published.record(
                job.snapshot.config, facts, policy, host, address, failure, detail
            )

    @staticmethod
    def policy(job: Job, host: str, facts: DomainFacts | None = None) -> OutboundPolicy:
        base = job.snapshot.outbound_tls(job.connector, host, job.domain)
        return secure_policy(base, job.snapshot.config.outbound_security, facts, host)

    def context(self, job: Job, policy: OutboundPolicy) -> ssl.SSLContext:
        return client_context(
            policy.minimum,
            policy.strength,
            validate=policy.validate,
            ca_files=[str(p) for p in job.snapshot.config.tls.ca_files],
            identity=job.snapshot.client_certificate(job.connector),
        )

    async def _connect(  # noqa: PLR0913 - where to, and under which policy
        self,
        job: Job,
        host: str,
        address: str,
        port: int,
        policy: OutboundPolicy,
        *,
        plaintext: bool = False,
    ) -> SmtpClient:
        implicit = job.connector.security == "implicit-tls" and not plaintext
        return await SmtpClient.connect(
            address,
            port,
            timeout=self.timeouts.delivery_connect,
            command_timeout=self.timeouts.delivery_command,
            tls=self.context(job, policy) if implicit else None,
            server_hostname=host,
        )

    async def _plaintext(
        self, job: Job, host: str, address: str, port: int, policy: OutboundPolicy
    ) -> AttemptReport | None:
        """Opportunistic TLS failed: the same host again, in the clear."""
        try:
            client = await self._connect(job, host, address, port, policy, plaintext=True)
        except DeliveryError:
            return None
        return await self._on(client, job, host, policy, fresh=True, plaintext=True)

    async def _on(  # noqa: PLR0913 - one connection's conversation and its context
        self,
        client: SmtpClient,
        job: Job,
        host: str,
        policy: OutboundPolicy,
        *,
        fresh: bool,
        plaintext: bool = False,
    ) -> AttemptReport | None:
        """The conversation on one connection; None when the server did not greet."""
        key = cache_key(job.connector.name, client.peer_address, client.peer_port, host, policy)
        try:
            if fresh:
                refusal = await self._open(client, job, host, policy, plaintext=plaintext)
                if refusal is not None:
                    await client.close()
                    relay = _relay(client, host)
                    return dataclasses.replace(refusal, relay=relay) if refusal.reached else refusal
            report = await self._transaction(client, job, host)
        except _TlsFellThrough:
            await client.close()
            raise
        except DeliveryError as exc:
            await client.close()
            text = f"4.4.2 connection to {host} failed: {exc}"
            lost = AttemptReport(_all(job, None, text), reached=True, connection_lost=True)
            return dataclasses.replace(lost, relay=_relay(client, host))
        if not report.reusable:
            await client.close()
            return report
        client.transactions += 1
        if 0 < self.per_connection(job) <= client.transactions:
            await client.close()  # the destination's messages_per_connection
            return report
        if any(o.code == 421 for o in report.outcomes):
            # The server is closing the channel (RFC 5321 §3.8), e.g. an idle timeout on a
            # cached connection: never keep it, and let a reuse retry on a fresh one.
            await client.close()
            return dataclasses.replace(report, connection_lost=True)
        self._keep(key, client)
        return report

    async def _open(
        self,
        client: SmtpClient,
        job: Job,
        host: str,
        policy: OutboundPolicy,
        *,
        plaintext: bool = False,
    ) -> AttemptReport | None:
        greeting = await client.greeting()
        if greeting.code != 220:  # e.g. 421 "too many connections": kept for the reason
            return AttemptReport([], reached=False, remote=greeting.text())
        reply = await client.hello(self.hostname)
        if reply.code != 250:
            return AttemptReport(_all(job, reply.code, reply.text()), reached=True)
        if client.tls is None and not plaintext and job.connector.security != "none":
            refusal = await self._starttls(client, job, host, policy)
            if refusal is not None:
                return refusal
        refusal = self._published_check(client, job, host, policy)
        if refusal is not None:
            return refusal
        if client.tls is None and policy.mandatory:
            why = (
                "offers no STARTTLS"
                if plaintext or "STARTTLS" not in client.extensions
                else ("did not complete TLS")
            )
            return AttemptReport(
                _all(
                    job,
                    None,
                    f"4.7.5 {host} {why}, and TLS is mandatory ({'; '.join(policy.reasons)})",
                ),
                True,
            )
        if client.tls is not None and policy.validate and not _names_ok(client, policy):
            return AttemptReport(
                _all(
                    job,
                    None,
                    f"4.7.5 the certificate of {host} does not match {', '.join(policy.names)}",
                ),
                True,
            )
        client.verified = client.verified or (client.tls is not None and policy.validate)
        return await self._authenticate(client, job, host)

    async def _starttls(
        self, client: SmtpClient, job: Job, host: str, policy: OutboundPolicy
    ) -> AttemptReport | None:
        if "STARTTLS" not in client.extensions:
            return None
        try:
            await client.starttls(self.context(job, policy), server_hostname=host)
        except DeliveryError as exc:
            failure = "certificate-not-trusted" if "CERTIFICATE_VERIFY" in str(exc) else None
            self._record(
                job, policy, host, client.peer_address, failure or "validation-failure", str(exc)
            )
            if policy.mandatory:
                return AttemptReport(_all(job, None, f"4.7.5 TLS with {host} failed: {exc}"), True)
            raise _TlsFellThrough(str(exc)) from exc
        await client.hello(self.hostname)
        return None

    async def _authenticate(self, client: SmtpClient, job: Job, host: str) -> AttemptReport | None:
        smarthost = job.connector.deliver.smarthost
        if smarthost is None or smarthost.username is None:
            return None
        if client.tls is None and job.connector.security != "none":
            return AttemptReport(
                _all(job, None, "4.7.0 refusing to send the smarthost password without TLS"), True
            )
        password = job.snapshot.smarthost_password(job.connector) or ""
        reply = await client.auth_plain(smarthost.username, password)
        if reply.code != 235:
            return AttemptReport(
                _all(job, None, f"4.7.0 AUTH with {host} failed: {reply.text()}"), True
            )
        return None

    async def _transaction(self, client: SmtpClient, job: Job, host: str) -> AttemptReport:
        recipients = [r for _, r in job.recipients]
        started = time.monotonic()
        done, dsn = await client.transaction(
            job.sender, job.params, recipients, job.body, self.timeouts.delivery_data_end
        )
        outcomes = [
            Outcome(idx, reply.code, reply.text())
            for (idx, _), reply in zip(job.recipients, done.replies, strict=True)
        ]
        return AttemptReport(
            outcomes,
            True,
            client.tls,
            host,
            dsn,
            verified=client.verified,
            reusable=done.reusable,
            relay=_relay(client, host),
            transmit=time.monotonic() - started,
            verified_by=client.verified_by,
        )

    # -- connection cache ------------------------------------------------------

    async def _cached(self, key: CacheKey) -> SmtpClient | None:
        """An idle connection to reuse (Postfix's connection cache); no probe round trip:
        a connection that turns out dead is replaced by a fresh one (see attempt)."""
        idle = self._cache.get(key)
        if idle:
            entry = idle.pop()
            entry.handle.cancel()
            return entry.client
        return None

    def _keep(self, key: CacheKey, client: SmtpClient) -> None:
        if self.cache_time <= 0:
            self._close_later(client)
            return
        handle = asyncio.get_running_loop().call_later(self.cache_time, self._expire, key, client)
        self._cache.setdefault(key, []).append(_Cached(client, handle))

    def _expire(self, key: CacheKey, client: SmtpClient) -> None:
        idle = self._cache.get(key, [])
        for entry in [e for e in idle if e.client is client]:
            idle.remove(entry)
            self._close_later(client)

    def _published_check(
        self, client: SmtpClient, job: Job, host: str, policy: OutboundPolicy
    ) -> AttemptReport | None:
        """DANE or MTA-STS on the open connection: a failure that defers, else None
        (and the server authenticated by DANE or MTA-STS is noted)."""
        if job.connector.deliver.dns is None or self._published is None:
            return None
        ssl_object = client.writer.get_extra_info("ssl_object") if client.tls else None
        ca_files = tuple(str(p) for p in job.snapshot.config.tls.ca_files)
        facts = self._facts.get(job.domain)
        check = check_session(facts, policy, host, ssl_object, ca_files)
        self._record(job, policy, host, client.peer_address, check.failure, check.text)
        if check.failure is not None and check.enforced:
            return AttemptReport(_all(job, None, check.text), True)
        if check.verified_by:
            client.verified, client.verified_by = True, check.verified_by
        return None

    async def close(self) -> None:
        if self._published is not None:
            await self._published.close()
            self._published = None
        # all at once: each QUIT may wait 5 s for a next hop that no longer
        # answers, and one after another they made a stop wait 5 s per connection
        closing = []
        for idle in self._cache.values():
            for entry in idle:
                entry.handle.cancel()
                closing.append(entry.client.close())
        self._cache.clear()
        await asyncio.gather(*closing, return_exceptions=True)
