"""The composition root: configuration → listeners, handler, signals.

Nothing here parses SMTP or decides policy: it builds the pieces
(``smtpgate.gateway`` for the handler) and runs them until a stop signal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

from smtpgate.config.schema import GatewayConfig, RequireCertificate, RequireSpkiPin
from smtpgate.config.secret import load_key
from smtpgate.delivery.attempt import Deliverer
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
class Gateway:
    """Everything one running gateway is made of."""

    server: InboundServer
    queue: Queue
    manager: QueueManager
    reloader: CertificateReloader
    manager_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        loop = asyncio.get_running_loop()
        self.manager_task = loop.create_task(self.manager.run())
        self.watch_task = loop.create_task(self.reloader.watch())

    async def stop(self, grace: float) -> None:
        """Listeners first (sessions finish their message), then deliveries, then the queue."""
        if self.watch_task is not None:
            self.watch_task.cancel()
        await self.server.stop(grace)
        await self.manager.stop(grace)
        if self.manager_task is not None:
            await self.manager_task
        await self.queue.close()


async def build_gateway(config: GatewayConfig) -> Gateway:
    """Open the queue and build listeners, handler and queue manager."""
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

    def handler_factory() -> SessionHandler:
        return GatewayHandler(policy, state, queue)

    contexts: dict[str, list[ssl.SSLContext]] = {}
    certificates = load_certificates(config)  # once: listeners and client identities
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
        policy.smarthost_password,
        config.queue.connection_cache_time,
        tls_policy=policy.outbound_tls,
        identity_of=lambda c: certificates.get(c.client_certificate or ""),
        ca_files=tuple(str(p) for p in config.tls.ca_files),
    )
    manager = QueueManager(
        queue,
        deliverer,
        policy.route,
        config.queue,
        config.gateway.hostname,
        config.gateway.admin_address,
    )
    counts = await queue.call(queue.store.counts)
    log.info("queue opened", **counts)
    return Gateway(server, queue, manager, reloader)


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    gateway = await build_gateway(config)
    await gateway.start()
    pid_file = config.gateway.data_dir / "smtpgate.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, gateway.reloader.reload)  # `smtpgate reload`
    log.info("gateway ready", node=config.gateway.node, hostname=config.gateway.hostname)
    try:
        await until_stop_signal()
        log.info("shutting down", grace=config.timeouts.shutdown_grace)
        await gateway.stop(config.timeouts.shutdown_grace)
    finally:
        pid_file.unlink(missing_ok=True)


def run(config: GatewayConfig) -> None:
    """Run the gateway on uvloop when it is installed."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(serve(config))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
