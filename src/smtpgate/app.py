"""The composition root: configuration → listeners, handler, signals.

Nothing here parses SMTP or decides policy: it builds the pieces
(``smtpgate.gateway`` for the handler) and runs them until a stop signal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from smtpgate.config.schema import GatewayConfig
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
from smtpgate.spool import clean_orphans
from smtpgate.tls.context import server_context

log = get_logger("smtpgate.app")


def session_limits(config: GatewayConfig) -> SessionLimits:
    lim = config.limits
    return SessionLimits(
        max_command_line=lim.max_command_line,
        command_line_allowance=lim.command_line_allowance,
        max_line_length=lim.max_line_length,
        max_recipients=lim.max_recipients,
        max_message_size=lim.max_message_size,
        max_header_size=lim.max_header_size,
        max_errors=lim.max_errors,
    )


def listener_specs(config: GatewayConfig, spool_dir: Path) -> list[ListenerSpec]:
    certificates = {c.name: c for c in config.certificates}
    specs = []
    for listener in config.listeners:
        context = None
        if listener.certificate is not None and listener.security != "none":
            cert = certificates[listener.certificate]
            context = server_context(cert.cert, cert.key)
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


def build_server(config: GatewayConfig) -> InboundServer:
    spool_dir = config.gateway.data_dir / "spool"
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    removed = clean_orphans(spool_dir)
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
        return GatewayHandler(policy, state)

    specs = listener_specs(config, spool_dir)
    return InboundServer(specs, handler_factory, limits, config.gateway.hostname)


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = build_server(config)
    await server.start()
    log.info("gateway ready", node=config.gateway.node, hostname=config.gateway.hostname)
    await until_stop_signal()
    log.info("shutting down", grace=config.timeouts.shutdown_grace)
    await server.stop(config.timeouts.shutdown_grace)


def run(config: GatewayConfig) -> None:
    """Run the gateway on uvloop when it is installed."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(serve(config))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
