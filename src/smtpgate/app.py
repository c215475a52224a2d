"""The composition root: configuration → listeners, handler, signals.

Nothing here parses SMTP or decides policy: it builds the pieces
(``smtpgate.gateway`` for the handler) and runs them until a stop signal.

The running configuration is a :class:`Live` snapshot. Applying a revision
swaps it in one assignment: sessions that start afterwards and every later
queue run use the new snapshot, sessions already open keep the one they
started with, and no connection is touched. Settings bound to sockets and
TLS contexts (see ``smtpgate.config.document.LIVE``) wait for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpgate.admin.api import ApiContext, ApiServer, create_app
from smtpgate.admin.services import ConfigService
from smtpgate.config.document import diff, restart_required, to_document
from smtpgate.config.load import parse_config
from smtpgate.config.schema import (
    GatewayConfig,
    RequireCertificate,
    RequireSpkiPin,
    parse_listen_address,
)
from smtpgate.config.secret import load_key
from smtpgate.config.store import ConfigStore
from smtpgate.delivery.attempt import Deliverer
from smtpgate.errors import ConfigError
from smtpgate.gateway import GatewayHandler, GatewayPolicy, GatewayState
from smtpgate.inbound.server import (
    InboundServer,
    ListenerSpec,
    ServerLimits,
    until_stop_signal,
)
from smtpgate.inbound.session import SessionHandler, SessionSettings
from smtpgate.observe.log import get_logger
from smtpgate.proto.server import SessionLimits
from smtpgate.queue.manager import QueueManager
from smtpgate.queue.queue import Queue
from smtpgate.queue.store import QueueStore
from smtpgate.spool import clean_orphans
from smtpgate.tls.certificates import Loaded, load_all
from smtpgate.tls.context import require_client_identity, server_context
from smtpgate.tls.reload import CertificateReloader

log = get_logger("smtpgate.app")


def session_limits(config: GatewayConfig) -> SessionLimits:
    """The protocol core's limits, taken from ``limits`` by name (the core cannot
    import the configuration; a limit the schema lacks keeps the core's default)."""
    configured = config.limits.model_dump()
    names = [f.name for f in dataclasses.fields(SessionLimits) if f.name in configured]
    return SessionLimits(**{name: configured[name] for name in names})


def load_certificates(config: GatewayConfig) -> dict[str, Loaded]:
    data_dir = config.gateway.data_dir
    return load_all(config.certificates, lambda: load_key(data_dir, create=False))


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


@dataclass
class Live:
    """The snapshot new sessions and queue runs use; replaced whole on apply."""

    config: GatewayConfig
    policy: GatewayPolicy
    certificates: dict[str, Loaded]
    revision: int | None = None


@dataclass
class Gateway:
    """Everything one running gateway is made of."""

    server: InboundServer
    queue: Queue
    manager: QueueManager
    reloader: CertificateReloader
    live: Live
    started: GatewayConfig  # what the listeners were built from
    store: ConfigStore | None = None
    manager_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None
    config_task: asyncio.Task[None] | None = None
    config_changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def start(self) -> None:
        await self.server.start()
        loop = asyncio.get_running_loop()
        self.manager_task = loop.create_task(self.manager.run())
        self.watch_task = loop.create_task(self.reloader.watch())
        if self.store is not None:
            self.config_task = loop.create_task(self._follow_store(self.store))

    def swap(self, config: GatewayConfig, revision: int | None) -> None:
        """Make ``config`` the snapshot for new sessions and queue runs."""
        policy = GatewayPolicy.build(config)  # may raise ConfigError: keep the old one
        certificates = load_certificates(config)
        self.live = Live(config, policy, certificates, revision)
        self.manager.settings = config.queue
        self.manager.admin_address = config.gateway.admin_address
        waiting = restart_required(diff(to_document(self.started), to_document(config)))
        log.info("configuration applied", revision=revision, restart_required=waiting or None)

    def restart_required(self) -> list[str]:
        return restart_required(diff(to_document(self.started), to_document(self.live.config)))

    async def _follow_store(self, store: ConfigStore) -> None:
        """Take on each newly applied revision (told directly by the API, or noticed
        within a second when the CLI or a peer applied it)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.config_changed.wait()
            self.config_changed.clear()
            try:
                number = await asyncio.to_thread(store.applied_number)
                if number is None or number == self.live.revision:
                    continue
                revision = await asyncio.to_thread(store.revision, number)
                if revision is not None:
                    self.swap(parse_config(revision.document), revision.number)
            except ConfigError as exc:
                log.error("cannot take on the applied configuration", error=str(exc))
            except Exception as exc:  # the store is unreachable: keep running as we are
                log.error("configuration store unreadable", error=repr(exc))

    async def stop(self, grace: float) -> None:
        """Listeners first (sessions finish their message), then deliveries, then the queue."""
        for task in (self.watch_task, self.config_task):
            if task is not None:
                task.cancel()
        await self.server.stop(grace)
        await self.manager.stop(grace)
        if self.manager_task is not None:
            await self.manager_task
        await self.queue.close()


async def build_gateway(
    config: GatewayConfig, revision: int | None = None, store: ConfigStore | None = None
) -> Gateway:
    """Open the queue and build listeners, handler and queue manager; with a
    ``store``, follow the revisions applied to it."""
    data_dir = config.gateway.data_dir
    spool_dir = data_dir / "spool"
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    removed = clean_orphans(spool_dir)
    queue = Queue(data_dir / "queue")
    removed += await queue.open()
    if removed:
        log.info("removed orphaned spool files", count=removed)
    policy = GatewayPolicy.build(config)
    state = GatewayState.for_config(config)
    limits = ServerLimits(
        max_connections=config.limits.max_connections,
        max_connections_per_ip=config.limits.max_connections_per_ip,
        tls_handshake_timeout=config.timeouts.tls_handshake,
    )

    contexts: dict[str, list[ssl.SSLContext]] = {}
    certificates = load_certificates(config)  # once: listeners and client identities
    live = Live(config, policy, certificates, revision)

    def handler_factory() -> SessionHandler:
        return GatewayHandler(gateway.live.policy, state, queue)  # pinned for the session

    specs = listener_specs(config, spool_dir, certificates, contexts)
    server = InboundServer(specs, handler_factory, limits, config.gateway.hostname)
    reloader = CertificateReloader(
        {c.name: (i, c) for i, c in enumerate(config.certificates)},
        contexts,
        lambda: load_key(data_dir, create=False),
    )
    deliverer = Deliverer(
        config.gateway.hostname,
        config.timeouts,
        state.resolver,
        # The lambdas read gateway.live at each call, so an apply reaches delivery.
        lambda c: gateway.live.policy.smarthost_password(c),  # noqa: PLW0108
        config.queue.connection_cache_time,
        tls_policy=lambda c, host, domain: gateway.live.policy.outbound_tls(c, host, domain),  # noqa: PLW0108
        identity_of=lambda c: gateway.live.certificates.get(c.client_certificate or ""),
        ca_files=tuple(str(p) for p in config.tls.ca_files),
    )
    manager = QueueManager(
        queue,
        deliverer,
        lambda sender, rcpt, exclude: gateway.live.policy.route(sender, rcpt, exclude),  # noqa: PLW0108
        config.queue,
        config.gateway.hostname,
        config.gateway.admin_address,
    )
    counts = await queue.call(queue.store.counts)
    log.info("queue opened", **counts)
    gateway = Gateway(server, queue, manager, reloader, live, config, store)
    return gateway


def status_of(gateway: Gateway, store: ConfigStore) -> dict[str, Any]:
    """What ``GET /api/v1/status`` reports (read from the API's thread)."""
    live = gateway.live
    queue = QueueStore(live.config.gateway.data_dir / "queue")
    try:
        counts = queue.counts()
    finally:
        queue.close()
    return {
        "node": live.config.gateway.node,
        "hostname": live.config.gateway.hostname,
        "running_revision": live.revision,
        "applied_revision": store.applied_number(),
        "restart_required": gateway.restart_required(),
        "listeners": [
            {"name": x.name, "address": x.address, "security": x.security}
            for x in gateway.started.listeners
        ],
        "queue": counts,
    }


def start_api(gateway: Gateway, store: ConfigStore) -> ApiServer | None:
    """The REST API on ``admin.listen`` (its own thread), or None when it is off."""
    config = gateway.started
    if not config.admin.listen:
        return None
    loop = asyncio.get_running_loop()

    def applied(_number: int) -> None:  # called in the API's thread
        loop.call_soon_threadsafe(gateway.config_changed.set)

    service = ConfigService(store, config.gateway.data_dir, on_applied=applied)
    context = ApiContext(service, lambda: status_of(gateway, store))
    host, port = parse_listen_address(config.admin.listen)
    api = ApiServer(create_app(context), host, port)
    api.start()
    log.info("admin API listening", address=config.admin.listen)
    return api


async def serve(
    config: GatewayConfig, store: ConfigStore | None = None, revision: int | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    gateway = await build_gateway(config, revision, store)
    await gateway.start()
    api = start_api(gateway, store) if store is not None else None
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
        await until_stop_signal()
        log.info("shutting down", grace=config.timeouts.shutdown_grace)
        if api is not None:
            await asyncio.to_thread(api.stop)
        await gateway.stop(config.timeouts.shutdown_grace)
    finally:
        pid_file.unlink(missing_ok=True)


def run(
    config: GatewayConfig, store: ConfigStore | None = None, revision: int | None = None
) -> None:
    """Run the gateway on uvloop when it is installed."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(serve(config, store, revision))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, store, revision))
