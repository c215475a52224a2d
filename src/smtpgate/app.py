"""The composition root: configuration → listeners, handler, signals.

Nothing here parses SMTP or decides policy: it builds the pieces
(``smtpgate.gateway`` for the handler) and runs them until a stop signal.

The running configuration is one compiled :class:`~smtpgate.snapshot.Snapshot`
held by ``gateway.current``; every consumer reads it through ``current()``.
Applying a revision compiles a new snapshot (if that fails, the old one keeps
running) and swaps one reference: sessions that start afterwards and every
later queue run use it, sessions already open keep the one they started
with, and no connection is touched. Settings bound to sockets and
TLS contexts (see ``smtpgate.config.document.LIVE``) wait for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from smtpgate import __version__
from smtpgate.admin import nodes
from smtpgate.config.document import (
    Document,
    diff,
    local_part,
    merge,
    restart_required,
    shared_part,
    to_document,
)
from smtpgate.config.load import parse_config
from smtpgate.config.schema import (
    GatewayConfig,
    RequireCertificate,
    RequireSpkiPin,
    parse_listen_address,
)
from smtpgate.config.secret import load_key
from smtpgate.config.store import ConfigStore
from smtpgate.config.watch import RevisionWatcher
from smtpgate.content import registry
from smtpgate.content.pipeline import Scanner
from smtpgate.content.quarantine import DAY, Quarantine, quarantine_dir
from smtpgate.delivery.attempt import Deliverer
from smtpgate.fetch.fetcher import Fetcher
from smtpgate.fetch.state import FetchState, FileState, StoreState
from smtpgate.files import make_private, private_dir
from smtpgate.gateway import GatewayHandler, GatewayState
from smtpgate.inbound import throttle
from smtpgate.inbound.contract import SessionHandler, SessionSettings
from smtpgate.inbound.counts import ConnectionCounts, SharedCounts
from smtpgate.inbound.server import (
    InboundServer,
    ListenerSpec,
    ServerLimits,
    stop_requested,
)
from smtpgate.inbound.throttle import SharedAuthThrottle
from smtpgate.observe import events
from smtpgate.observe.health import Heartbeat, process_alive, read_health
from smtpgate.observe.log import get_logger, log_options, set_target
from smtpgate.observe.maillog import MailLog
from smtpgate.observe.metrics import Metrics, read_exposition
from smtpgate.observe.tracking import TrackingWriter
from smtpgate.privileges import Drop
from smtpgate.proto.server import observe_replies
from smtpgate.proto.state import SessionLimits
from smtpgate.queue.manager import QueueManager
from smtpgate.queue.queue import Queue
from smtpgate.queue.states import MessageKind
from smtpgate.queue.store import Owner
from smtpgate.queue.tlsreports import tls_report_submitter
from smtpgate.snapshot import Current, Snapshot
from smtpgate.spool import clean_orphans
from smtpgate.tls.certificates import Loaded
from smtpgate.tls.context import require_client_identity, server_context
from smtpgate.tls.expiry import STATE_FILE, ExpiryNotices, Notice, configured_leaves, notice_message
from smtpgate.tls.reload import CertificateReloader

log = get_logger("smtpgate.app")

STORE_POLL = 0.25  # seconds between looks at the store's applied revision
# ... while a LISTEN connection pushes each apply (PostgreSQL): the poll is only
# the safety net for a lost notification
STORE_POLL_LISTENING = 2.0
# seconds a stopping gateway waits for the POP3 fetch to finish its message: aborting
# is always safe (no QUIT, nothing deleted; a queued message's UIDL is kept)
FETCH_GRACE = 5.0
WORKERS_CATCH_UP = 2.0  # seconds the first worker waits for the others to run a revision
STORE_RETRY = 5.0  # seconds between attempts to reach a store that was down at start


def session_limits(config: GatewayConfig) -> SessionLimits:
    """The protocol core's limits, taken from ``limits`` by name (the core cannot
    import the configuration; a limit the schema lacks keeps the core's default)."""
    configured = config.limits.model_dump()
    names = [f.name for f in dataclasses.fields(SessionLimits) if f.name in configured]
    return SessionLimits(**{name: configured[name] for name in names})


def listener_specs(
    config: GatewayConfig,
    spool_dir: Path,
    certificates: dict[str, Loaded],
    contexts: dict[str, list[ssl.SSLContext]],
) -> list[ListenerSpec]:
    """The listeners; ``contexts`` collects each certificate's contexts for reloads."""
    specs = []
    for listener in config.listeners:
        context, pin, spki = None, None, None
        if listener.certificate is not None and listener.security != "none":
            context = server_context(
                certificates[listener.certificate], config.tls.protocols, config.tls.cipher_strength
            )
            contexts.setdefault(listener.certificate, []).append(context)
            identity = listener.client_identity
            if identity != "any":
                anchor: str | Loaded = "trusted"
                if isinstance(identity, RequireCertificate):
                    anchor = certificates[identity.require_certificate]
                elif isinstance(identity, RequireSpkiPin):
                    spki = identity.require_spki_pin
                pin = require_client_identity(
                    context, anchor, [str(p) for p in config.tls.ca_files]
                )
        settings = SessionSettings(
            limits=session_limits(config),
            command_timeout=config.timeouts.command,
            data_timeout=config.timeouts.data,
            tls_handshake_timeout=config.timeouts.tls_handshake,
            spool_dir=spool_dir,
            tls_context=context if listener.security in ("starttls", "require-starttls") else None,
            require_tls=listener.security == "require-starttls",
            proxy_protocol=listener.proxy_protocol,
            proxy_timeout=config.timeouts.proxy_header,
            plaintext_auth_on_loopback=listener.plaintext_auth_on_loopback,
            banner=config.gateway.banner,
            client_certificate_required=listener.client_identity != "any",
            client_certificate_pin=pin,
            client_spki_pin=spki,
        )
        implicit = context if listener.security == "implicit-tls" else None
        specs.append(
            ListenerSpec(
                listener.name,
                listener.host,
                listener.port,
                implicit,
                settings,
            )
        )
    return specs


@dataclass(frozen=True)
class WorkerRole:
    """This process as worker ``index`` of ``count`` (``gateway.workers`` > 1,
    started by ``smtpgate.supervisor``): it accepts on the sockets the
    supervisor bound, queues into the shared queue and delivers its own
    messages. Worker 0 also does what the node does once: reports to the
    store, the heartbeat the API reads, POP3 fetching, certificate expiry
    notices and the quarantine's expiry."""

    index: int
    count: int
    sockets: dict[str, list[socket.socket]]  # listener name → bound sockets
    connections: Path | None = None  # the shared connection counts (inbound/counts.py)
    supervisor: int = dataclasses.field(default_factory=os.getppid)  # serve's pid

    @property
    def primary(self) -> bool:
        return self.index == 0

    def directory(self, data_dir: Path) -> Path:
        """This worker's own files: its heartbeat, metrics and connector board."""
        return data_dir / WORKERS_DIR / str(self.index)


WORKERS_DIR = "workers"


@dataclass
class Gateway:
    """Everything one running gateway is made of."""

    server: InboundServer
    queue: Queue
    manager: QueueManager
    reloader: CertificateReloader
    current: Current
    started: GatewayConfig  # what the listeners were built from
    store: ConfigStore | None = None
    manager_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None
    config_task: asyncio.Task[None] | None = None
    waiting: list[str] = dataclasses.field(default_factory=list)  # applied, not yet in force
    refused: int | None = None  # an applied revision this node could not take on
    refused_error: str = ""  # ... and why
    store_error: str = ""  # the store is unreachable: why (empty while it answers)
    opener: Callable[[], ConfigStore] | None = None  # to reach the store started without
    # one report at a time, none after the last ("stopped"): a heartbeat still in
    # its thread when the gateway stops must not overwrite that one
    reporting: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    reported_stop: bool = False
    # observability (observe.*): outside the snapshot, so an apply keeps the counters
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    heartbeat: Heartbeat | None = None
    heartbeat_task: asyncio.Task[None] | None = None
    tracking: TrackingWriter | None = None
    unsubscribe: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    quarantine: Quarantine | None = None  # held messages; expired in the background
    scanners: list[Scanner] = dataclasses.field(default_factory=list)  # closed at stop
    quarantine_task: asyncio.Task[None] | None = None
    # run once the listeners are bound, before any connection is handled (no await
    # in between): the privilege drop
    after_bind: Callable[[], None] | None = None
    expiry: ExpiryNotices | None = None  # certificate expiry notices, at start and daily
    expiry_task: asyncio.Task[None] | None = None
    fetcher: Fetcher | None = None  # the POP3 receive connectors (fetch/)
    fetch_task: asyncio.Task[None] | None = None
    role: WorkerRole | None = None  # one of several worker processes (None: the only one)

    @property
    def primary(self) -> bool:
        """This process does the node's once-only work (reports, fetching, ...)."""
        return self.role is None or self.role.primary

    async def start(self) -> None:
        await self.server.start()
        if self.after_bind is not None:
            self.after_bind()
        loop = asyncio.get_running_loop()
        if self.quarantine is not None:
            self.quarantine_task = loop.create_task(self.quarantine.expire_forever())
        self.manager_task = loop.create_task(self.manager.run())
        if self.fetcher is not None:
            self.fetch_task = loop.create_task(self.fetcher.run())
        if self.expiry is not None:
            self.expiry_task = loop.create_task(self.expiry.run())
        self.watch_task = loop.create_task(self.reloader.watch())
        if self.store is not None:
            if self.primary:
                await self._first_report(self.store)
            self.config_task = loop.create_task(self._follow_store(self.store))
        elif self.opener is not None:
            self.config_task = loop.create_task(self._reach_store(self.opener))
        if self.tracking is not None:  # after a privilege drop: its files are the user's
            self.tracking.start()
        if self.heartbeat is not None:
            await self.heartbeat.beat()  # ready as soon as the listeners are bound
            self.heartbeat_task = loop.create_task(self.heartbeat.run())

    async def _first_report(self, store: ConfigStore) -> None:
        """Say at once that this node runs; a store that fails now is one that
        went away since the start: noted like any outage, reported again later."""
        try:
            await self.publish(store)
        except Exception as exc:
            log.error("configuration store unreachable", error=repr(exc))
            self.store_error = repr(exc)

    async def _reach_store(self, opener: Callable[[], ConfigStore]) -> None:
        """Started without the store (it was unreachable): try again every few
        seconds, then follow it like any node, taking on what was applied meanwhile."""
        while True:
            try:
                store = await asyncio.to_thread(opener)
            except Exception as exc:  # still down
                self.store_error = repr(exc)
                await asyncio.sleep(STORE_RETRY)
                continue
            log.info("configuration store reachable again")
            self.store, self.store_error = store, ""
            await self._follow_store(store)

    async def publish(self, store: ConfigStore, *, stopped: bool = False) -> None:
        """Report what this node runs, with its queue counts, to the store;
        ``stopped``: the last report, saying that this node stopped. Only the
        first worker reports, for all of them (``status_of``)."""
        if not self.primary:
            return
        status = status_of(self) | {"queue": await self.queue.call(self.queue.store.counts)}
        if stopped:
            status["stopped"] = True
        node = self.current().config.gateway.node

        def report() -> None:
            with self.reporting:
                if not self.reported_stop:
                    nodes.publish(store, node, status, time.time())
                    self.reported_stop = stopped

        await asyncio.to_thread(report)

    async def _report_stop(self) -> None:
        """Tell the peers at once that this node stopped (``cluster status``:
        down; an apply does not wait for it), unless the store is out of reach."""
        if self.store is None or self.store_error:
            return
        try:
            await self.publish(self.store, stopped=True)
        except Exception as exc:  # the store went away meanwhile: the report ages out
            log.warning("cannot report the stop to the configuration store", error=repr(exc))

    def swap(self, config: GatewayConfig, revision: int | None) -> None:
        """Make ``config`` the snapshot for new sessions and queue runs."""
        self.current.swap(Snapshot.compile(config, revision))  # raises: the old one stays
        document = to_document(config)
        if self.primary:  # one writer of the node's cache
            nodes.remember_applied(config.gateway.data_dir, revision, shared_part(document))
        self.waiting = restart_required(diff(to_document(self.started), document))
        log.info("configuration applied", revision=revision, restart_required=self.waiting or None)
        if self.heartbeat is not None and not self.primary:  # the first worker waits for it
            self.heartbeat.soon()

    async def _follow_store(self, store: ConfigStore) -> None:
        """Take on each newly applied revision, whoever applied it (the API's
        process, the CLI, a peer): at once when PostgreSQL notifies it, else at
        the next poll; and report what runs (after the swap, so a report never
        runs ahead of the policy) and a heartbeat."""
        async with RevisionWatcher.for_store(store) as watcher:
            await self._follow(store, watcher)

    async def _follow(self, store: ConfigStore, watcher: RevisionWatcher) -> None:
        published = time.monotonic()
        while True:
            await watcher.wait(STORE_POLL_LISTENING if watcher.listening else STORE_POLL)
            try:
                if await self._follow_once(store) or (
                    time.monotonic() - published >= nodes.HEARTBEAT
                ):
                    await self._workers_caught_up()
                    await self.publish(store)
                    published = time.monotonic()
                if self.store_error:
                    log.info("configuration store reachable again")
                    self.store_error = ""
            except Exception as exc:  # the store is unreachable: keep running as we are
                if not self.store_error:  # once per outage, not four times a second
                    log.error("configuration store unreachable", error=repr(exc))
                self.store_error = repr(exc)

    async def _follow_once(self, store: ConfigStore) -> bool:
        """Take on a newly applied revision, if any; whether there was one."""
        number = await asyncio.to_thread(store.applied_number)
        if number in (None, self.current().revision, self.refused):
            return False
        revision = await asyncio.to_thread(store.revision, number)
        if revision is None:
            return False
        self._take_on(revision.document, revision.number)
        return True

    async def _workers_caught_up(self, wait: float = WORKERS_CATCH_UP) -> None:
        """The first worker, before it reports a revision: give the other workers
        (each following the store itself) a moment to run it too, so that an
        apply that returns "applied" is enforced by every worker."""
        if self.role is None or not self.role.primary or self.role.count == 1:
            return
        data_dir, mine = self.started.gateway.data_dir, self.current().revision
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            peers = worker_reports(data_dir, self.role.count)
            if all(p.get("revision") == mine or p.get("refused") == mine for p in peers):
                return
            await asyncio.sleep(0.01)

    def _take_on(self, shared: Document, number: int) -> None:
        """The store's shared settings with this node's own, from its file."""
        local = local_part(to_document(self.started))
        try:
            self.swap(parse_config(merge(shared_part(shared), local)), number)
        except Exception as exc:  # e.g. a key file changed since validate: say so once
            self.refused, self.refused_error = number, str(exc)
            log.error("cannot take on the applied configuration", revision=number, error=str(exc))
            if self.heartbeat is not None and not self.primary:
                self.heartbeat.soon()

    async def stop(self, grace: float) -> None:
        """Listeners first (sessions finish their message), then deliveries, then the queue."""
        if self.heartbeat_task is not None:  # not ready any more
            self.heartbeat_task.cancel()
        if self.heartbeat is not None:
            self.heartbeat.stopped()
        for task in (self.watch_task, self.config_task, self.quarantine_task, self.expiry_task):
            if task is not None:
                task.cancel()
        await self.server.stop(grace)
        if self.fetcher is not None and self.fetch_task is not None:  # ends between messages
            await self.fetcher.stop()
            try:  # a message being fetched gets a moment; the mailbox keeps the rest
                await asyncio.wait_for(asyncio.shield(self.fetch_task), min(grace, FETCH_GRACE))
            except TimeoutError:
                self.fetcher.abort()  # its thread returns now, not at the socket timeout
            self.fetch_task.cancel()
        await registry.close(self.scanners)  # no session scans any more
        await self.manager.stop(grace)
        if self.manager_task is not None:
            await self.manager_task
        await self._report_stop()
        await self.queue.close()
        for unsubscribe in self.unsubscribe:
            unsubscribe()
        if self.tracking is not None:
            await asyncio.to_thread(self.tracking.stop)


def tidy_data_dir(data_dir: Path) -> None:
    """Before anything serves: every file private, and the quarantine files a
    crash left unfinished removed (only while no process of the gateway runs:
    a running one may be writing them)."""
    for changed in make_private(data_dir):
        log.warning("made private", path=changed)
    quarantine = Quarantine(quarantine_dir(data_dir), lambda: 0.0)
    if orphans := quarantine.store.clean_orphans():
        log.info("removed unfinished quarantine files", count=orphans)


async def build_gateway(
    config: GatewayConfig,
    revision: int | None = None,
    store: ConfigStore | None = None,
    role: WorkerRole | None = None,
) -> Gateway:
    """Open the queue and build listeners, handler and queue manager; with a
    ``store``, follow the revisions applied to it; with a ``role``, as one of
    several worker processes."""
    data_dir = config.gateway.data_dir
    primary = role is None or role.primary
    if role is None:  # the supervisor did this before starting the workers
        await asyncio.to_thread(tidy_data_dir, data_dir)
    spool_dir = private_dir(data_dir / "spool")
    if role is not None and role.index:  # its own: its start cleans only its own orphans
        spool_dir = private_dir(spool_dir / f"w{role.index}")
    if role is not None:
        private_dir(role.directory(data_dir))
    removed = clean_orphans(spool_dir)
    owner = Owner(role.index, role.count) if role is not None else Owner()
    queue = Queue(data_dir / "queue", owner=owner)
    removed += await queue.open()
    if removed:
        log.info("removed orphaned spool files", count=removed)
    current = Current(Snapshot.compile(config, revision))  # certificates loaded once
    certificates = current().certificates  # the listeners' and the client identities
    state = GatewayState.for_config(config)
    if role is not None and role.count > 1:  # a client's attempts, whichever worker it meets
        state.throttle = SharedAuthThrottle(data_dir / WORKERS_DIR / throttle.FILE, config.limits)
    quarantine = Quarantine(
        quarantine_dir(data_dir), lambda: current().config.quarantine.retention_days * DAY
    )
    state.quarantine = quarantine
    limits = ServerLimits(
        max_connections=config.limits.max_connections,
        max_connections_per_ip=config.limits.max_connections_per_ip,
        tls_handshake_timeout=config.timeouts.tls_handshake,
        reserved_connections=config.limits.reserved_connections,
    )

    contexts: dict[str, list[ssl.SSLContext]] = {}

    def handler_factory() -> SessionHandler:
        return GatewayHandler(current(), state, queue)  # pinned for the session

    def known_client(client_ip: str) -> bool:
        return current().known_client(client_ip)

    specs = listener_specs(config, spool_dir, certificates, contexts)
    server = InboundServer(
        specs,
        handler_factory,
        limits,
        config.gateway.hostname,
        known_client=known_client,
        sockets=role.sockets if role is not None else None,
        counts=shared_counts(role) if role is not None else None,
    )
    reloader = CertificateReloader(
        {c.name: (i, c) for i, c in enumerate(config.certificates)},
        contexts,
        lambda: load_key(data_dir, create=False),
    )
    deliverer = Deliverer(
        config.gateway.hostname,
        config.timeouts,
        state.resolver,
        config.queue.connection_cache_time,
    )
    deliverer.report_submit = tls_report_submitter(queue)  # TLSRPT mailto: through the queue
    deliverer.daily_reports = primary  # one worker sends them, once
    manager = QueueManager(queue, deliverer, current, config.gateway.hostname)
    if primary:
        counts = await queue.call(queue.store.counts)
        log.info("queue opened", **counts)
        nodes.remember_applied(data_dir, revision, shared_part(to_document(config)))
    gateway = Gateway(server, queue, manager, reloader, current, config, store)
    gateway.role = role
    gateway.scanners = state.scanners
    if primary:  # the node's once-only work
        gateway.quarantine = quarantine
        gateway.expiry = expiry_notices(gateway, data_dir)
        gateway.fetcher = Fetcher(current, state, queue, spool_dir, lambda: fetch_state(gateway))
    observe(gateway, config)
    return gateway


def shared_counts(role: WorkerRole) -> ConnectionCounts | None:
    """The connection counts all workers share (None: this worker counts alone)."""
    if role.connections is None:
        return None
    counts = SharedCounts.attach(role.connections, role.index)
    counts.forget_worker(role.index)  # what this worker's predecessor left counted
    return counts


def observe(gateway: Gateway, config: GatewayConfig) -> None:
    """The mail log, the metrics, the tracking store and the heartbeat of ``gateway``."""
    set_target(config.logging.target, config.logging.syslog_address)
    data_dir, current = config.gateway.data_dir, gateway.current
    tracking = TrackingWriter(data_dir, lambda: current().config.tracking.retention_days)
    gateway.tracking = tracking
    for subscriber in (MailLog(), gateway.metrics, tracking):
        gateway.unsubscribe.append(events.hub.subscribe(subscriber))
    observe_replies(gateway.metrics.count_reply)

    role = gateway.role
    if role is not None and not role.primary:  # its own facts, for the first worker
        gateway.heartbeat = Heartbeat(
            role.directory(data_dir), gateway.metrics, lambda: worker_sample(gateway)
        )
        return

    async def sample() -> dict[str, Any]:
        queue, server = gateway.queue, gateway.server
        counts = await queue.call(queue.store.counts)
        oldest = await queue.call(queue.store.oldest_arrival)
        sessions = open_sessions(server)
        try:
            listeners = server.bound_ports()
        except (ValueError, IndexError, OSError):  # not (or no longer) bound
            listeners = {spec.name: 0 for spec in server.specs}
        running = current()
        expiry = {
            name: loaded.chain[0].not_valid_after_utc.timestamp()
            for name, loaded in running.certificates.items()
            if loaded.chain
        }
        return {
            "queue": counts,
            "queue_oldest_age": max(0.0, time.time() - oldest) if oldest else 0.0,
            "sessions": sessions,
            "listeners": listeners,
            "store_error": gateway.store_error,
            "revision": running.revision,
            "certificates": expiry,
            "metrics_public": gateway.started.admin.metrics_public,
            "tracking_dropped": tracking.dropped,
            "workers": role.count if role is not None else 1,
        }

    peers = None
    if role is not None:

        def peers() -> list[bytes]:
            return worker_metrics(data_dir, role.count)

    gateway.heartbeat = Heartbeat(data_dir, gateway.metrics, sample, peers=peers)


def open_sessions(server: InboundServer) -> dict[str, int]:
    """Open sessions by listener (every listener named, idle ones with 0)."""
    sessions = {spec.name: 0 for spec in server.specs}
    for session in server.sessions:
        sessions[session.listener] = sessions.get(session.listener, 0) + 1
    return sessions


async def worker_sample(gateway: Gateway) -> dict[str, Any]:
    """What a worker other than the first reports about itself."""
    return {
        "sessions": open_sessions(gateway.server),
        "revision": gateway.current().revision,
        "refused": gateway.refused,
        "store_error": gateway.store_error,
        "tracking_dropped": gateway.tracking.dropped if gateway.tracking else 0,
        "scanners": registry.states(gateway.scanners),  # each worker meets its own outages
    }


def worker_reports(data_dir: Path, count: int) -> list[dict[str, Any]]:
    """The heartbeats of the other live workers (a dead one is being restarted:
    it starts with the newest revision)."""
    found = []
    for index in range(1, count):
        report = read_health(data_dir / WORKERS_DIR / str(index))
        if report is not None and process_alive(report.get("pid")):
            found.append(report)
    return found


def worker_metrics(data_dir: Path, count: int) -> list[bytes]:
    """The metrics the other live workers wrote, to be merged with the first's."""
    found = []
    for index in range(1, count):
        directory = data_dir / WORKERS_DIR / str(index)
        report = read_health(directory)
        text = read_exposition(directory)
        if report is not None and process_alive(report.get("pid")) and text is not None:
            found.append(text)
    return found


def fetch_state(gateway: Gateway) -> FetchState:
    """Where the POP3 connectors keep their ids and leases: the store when there is one."""
    if gateway.store is not None:
        return StoreState(gateway.store)
    return FileState(gateway.current().config.gateway.data_dir)


def expiry_notices(gateway: Gateway, data_dir: Path) -> ExpiryNotices:
    """Notices of certificates about to expire, queued for ``gateway.admin_address``
    (as it is when each is sent) like the gateway's own reports."""

    async def notify(notice: Notice, now: dt.datetime) -> bool:
        config = gateway.current().config
        if config.gateway.admin_address is None:
            return False
        envelope, body = notice_message(notice, config, gateway.queue.directory, now)
        queue_id = await gateway.queue.ingest(envelope, body, MessageKind.ADMIN_REPORT)
        log.info(
            "certificate expiry notice queued",
            queue_id=queue_id,
            certificate=notice.name,
            days=notice.days,
            to=config.gateway.admin_address,
        )
        return True

    def leaves() -> list[tuple[str, x509.Certificate]]:
        running = gateway.current()
        return configured_leaves(running.config, running.certificates)

    return ExpiryNotices(data_dir / STATE_FILE, leaves, notify)


def status_of(gateway: Gateway) -> dict[str, Any]:
    """What this node runs, as published to the store for ``GET /api/v1/status``."""
    running = gateway.current()
    revision, refused, error = running.revision, gateway.refused, gateway.refused_error
    scanners = registry.states(gateway.scanners)
    if gateway.role is not None:  # the node runs what its slowest worker runs
        data_dir = gateway.started.gateway.data_dir
        for peer in worker_reports(data_dir, gateway.role.count):
            for name, state in (peer.get("scanners") or {}).items():
                if scanners.get(name, "up") == "up":  # down in any worker: down
                    scanners[name] = state
            theirs = peer.get("revision")
            if isinstance(theirs, int) and isinstance(revision, int) and theirs < revision:
                revision = theirs
            if refused is None and isinstance(peer.get("refused"), int):
                refused, error = peer["refused"], "a worker could not take it on"
    return {
        "hostname": running.config.gateway.hostname,
        "running_revision": revision,
        "refused_revision": refused,
        "error": error,
        "restart_required": gateway.waiting,
        "listeners": [
            {"name": x.name, "address": x.address, "security": x.security}
            for x in gateway.started.listeners
        ],
        "pid": gateway.role.supervisor if gateway.role is not None else os.getpid(),
        "workers": gateway.role.count if gateway.role is not None else 1,
        "roles": list(running.roles),
        "version": __version__,
        "admin": gateway.started.admin.listen,
        "scanners": scanners,
    }


def bind_api_socket(listen: str) -> socket.socket:
    """The API's listening socket, bound here, in the gateway, and handed to the API
    process: a port taken by anything (another gateway's API included) fails now,
    with the reason, instead of being mistaken for our own API answering."""
    host, port = parse_listen_address(listen)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(f"the admin API cannot listen on {listen} (admin.listen): {reason}") from exc


async def start_api(
    config: GatewayConfig, drop: Drop | None = None
) -> asyncio.subprocess.Process | None:
    """The REST API on ``admin.listen`` in a child process, or None when it is off;
    with ``drop``, the child becomes that user before it opens anything."""
    if not config.admin.listen:
        return None
    certificate = config.admin.certificate
    if certificate is not None:  # a certificate that does not load stops the start here
        from smtpgate.admin.api import admin_tls_context  # noqa: PLC0415 - FastAPI only then

        admin_tls_context(config, config.gateway.data_dir, certificate)
    listening = bind_api_socket(config.admin.listen)
    with listening:
        fd = listening.fileno()
        command = [sys.executable, "-m", "smtpgate.cli.main", "admin", "api"]
        command += ["--data-dir", str(config.gateway.data_dir), "--listen", config.admin.listen]
        command += ["--fd", str(fd), *log_options()]
        command += ["--certificate", certificate] if certificate is not None else []
        command += ["--run-as", f"{drop.uid}:{drop.gid}"] if drop is not None else []
        child = await asyncio.create_subprocess_exec(*command, pass_fds=(fd,))
    host, port = parse_listen_address(config.admin.listen)
    deadline = time.monotonic() + 30
    while child.returncode is None and time.monotonic() < deadline:
        # only our child accepts on this socket
        if await _answers_http(host, port, tls=certificate is not None):
            return child
        await asyncio.sleep(0.05)
    if child.returncode is None:
        child.kill()
    raise OSError(f"the admin API did not start on {config.admin.listen} (admin.listen)")


async def _answers_http(host: str, port: int, *, tls: bool = False) -> bool:
    """Our API is up: it answers HTTP (401 without a token) on the socket we bound
    and handed to it, which nothing else can accept on; over TLS (``tls``) its
    certificate is not checked: this only asks whether our own child answers."""
    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            writer.write(b"GET /openapi.json HTTP/1.0\r\nHost: smtpgate\r\n\r\n")
            status = await reader.readline()
            writer.close()
    except (OSError, TimeoutError):
        return False
    return status.startswith(b"HTTP/1.1 ")


async def serve(
    config: GatewayConfig,
    store: ConfigStore | None = None,
    revision: int | None = None,
    opener: Callable[[], ConfigStore] | None = None,
    drop: Drop | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. The API starts
    first, so a taken ``admin.listen`` stops the start before any SMTP socket.
    Without a ``store`` (it was unreachable), ``opener`` reaches it later; the
    API, which works on the store, is not started then. With ``drop`` (started
    as root), ``data_dir`` becomes that user's and the process becomes that user
    once the listeners are bound."""
    stop = stop_requested()  # before anything starts: a stop during the start waits for it
    async with api_process(config, store, drop) as api:
        gateway = await build_gateway(config, revision, store)
        gateway.opener = opener
        if drop is not None:
            gateway.after_bind = lambda: drop_privileges(drop, config.gateway.data_dir)
        await gateway.start()
        await _run_until_stopped(gateway, config, (revision, stop), api)


@contextlib.asynccontextmanager
async def api_process(
    config: GatewayConfig, store: ConfigStore | None, drop: Drop | None
) -> AsyncIterator[asyncio.subprocess.Process | None]:
    """The API's process while the gateway runs (none without a store: it works
    on the store); ``data_dir`` given to ``drop``'s user first, for the API child."""
    if drop is not None:  # the store the CLI just made
        drop.own(config.gateway.data_dir)
    api = await start_api(config, drop) if store is not None else None
    try:
        yield api
    finally:
        if api is not None and api.returncode is None:
            api.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(api.wait(), 10)


def drop_privileges(drop: Drop, data_dir: Path) -> None:
    """Give ``data_dir`` (the queue and quarantine opened meanwhile) to the user,
    then become that user for good."""
    changed = drop.own(data_dir)
    drop.now()
    log.info("privileges dropped", user=drop.user, uid=drop.uid, gid=drop.gid, chowned=changed)


async def _run_until_stopped(
    gateway: Gateway,
    config: GatewayConfig,
    running: tuple[int | None, asyncio.Event],
    api: asyncio.subprocess.Process | None,
) -> None:
    revision, stop = running
    pid_file = config.gateway.data_dir / "smtpgate.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, gateway.reloader.reload)  # `smtpgate reload`
    log.info(
        "gateway ready",
        node=config.gateway.node,
        hostname=config.gateway.hostname,
        revision=revision,
    )
    try:
        await stop.wait()
        log.info("shutting down", grace=config.timeouts.shutdown_grace)
        if api is not None:
            api.terminate()  # no admin changes while the gateway winds down
        await gateway.stop(config.timeouts.shutdown_grace)
    finally:
        pid_file.unlink(missing_ok=True)


async def serve_worker(
    config: GatewayConfig,
    revision: int | None,
    role: WorkerRole,
    store: ConfigStore | None,
    opener: Callable[[], ConfigStore],
) -> None:
    """One worker of ``smtpgate.supervisor``: a gateway on the supervisor's
    sockets until SIGTERM; prints ``ready`` on stdout once it accepts."""
    stop = stop_requested()
    gateway = await build_gateway(config, revision, store, role)
    gateway.opener = opener
    await gateway.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, gateway.reloader.reload)
    print("ready", flush=True)
    os.dup2(2, 1)  # the supervisor reads no more: anything later goes to the log
    log.debug("worker ready", worker=role.index, pid=os.getpid(), revision=revision)
    await stop.wait()
    await gateway.stop(config.timeouts.shutdown_grace)


def run_worker(
    config: GatewayConfig,
    revision: int | None,
    role: WorkerRole,
    store: ConfigStore | None,
    opener: Callable[[], ConfigStore],
) -> None:
    """A worker on uvloop when it is installed."""
    work = serve_worker(config, revision, role, store, opener)
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(work)
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(work)


def run(
    config: GatewayConfig,
    store: ConfigStore | None = None,
    revision: int | None = None,
    *,
    opener: Callable[[], ConfigStore] | None = None,
    drop: Drop | None = None,
) -> None:
    """Run the gateway on uvloop when it is installed."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(serve(config, store, revision, opener, drop))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, store, revision, opener, drop))
