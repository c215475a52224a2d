"""The composition root: configuration → listeners, handler, delivery, signals.

``GatewayHandler`` is the gateway's answer to each session: relay control and
routing at RCPT (pure policy functions), hand-off to the chosen smarthost at
the end of the message. Nothing here parses SMTP or decides policy itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from smtpgate.config.schema import GatewayConfig, SendConnector
from smtpgate.delivery.relay import HandOff, relay_message
from smtpgate.inbound.server import (
    InboundServer,
    ListenerSpec,
    ServerLimits,
    until_stop_signal,
)
from smtpgate.inbound.session import SessionHandler, SessionInfo, SessionSettings
from smtpgate.model.envelope import Envelope
from smtpgate.observe.log import get_logger
from smtpgate.policy.relay import decide_relay, split_address
from smtpgate.policy.routing import select_connector
from smtpgate.proto import events as ev
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import SessionLimits
from smtpgate.spool import SpooledBody, clean_orphans
from smtpgate.tls.context import server_context

log = get_logger("smtpgate.app")

NO_ROUTE = Reply.of(550, "5.7.1", "No send connector for this recipient")
SPLIT_ROUTE = Reply.of(452, "4.5.3", "Send this recipient in a separate transaction")


@dataclass(frozen=True)
class Snapshot:
    """What sessions read, fixed for their lifetime."""

    config: GatewayConfig
    hosted: frozenset[str]
    roles: frozenset[str]

    @classmethod
    def of(cls, config: GatewayConfig) -> Snapshot:
        return cls(config, frozenset(config.hosted_domains), frozenset(config.gateway.roles))

    def route(self, sender: str, recipient: str) -> SendConnector | None:
        sender_domain = split_address(sender)[1] if sender else ""
        connectors = self.config.send_connectors
        return select_connector(connectors, self.roles, sender_domain, split_address(recipient)[1])


class GatewayHandler:
    """Per-session policy and hand-off for the gateway."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.connector: SendConnector | None = None

    async def on_connect(self, info: SessionInfo) -> Reply | None:
        log.info("connect", listener=info.listener, client=info.client_ip)
        return None

    def on_command(self, info: SessionInfo, event: ev.Event) -> Reply | None:
        if isinstance(event, ev.MailFrom):
            self.connector = None
        if isinstance(event, ev.RcptTo):
            return self._rcpt(info, event.recipient)
        return None

    def _rcpt(self, info: SessionInfo, recipient: str) -> Reply | None:
        verdict = decide_relay(recipient, self.snapshot.hosted)
        if verdict.reply is not None:
            log.info("recipient refused", client=info.client_ip, rcpt=recipient, why=verdict.reason)
            return verdict.reply
        connector = self.snapshot.route(info.sender or "", recipient)
        if connector is None:
            return NO_ROUTE
        if self.connector is not None and connector.name != self.connector.name:
            return SPLIT_ROUTE  # one hand-off per message until the queue routes per recipient
        self.connector = connector
        return None

    async def on_message(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        connector = self.connector
        self.connector = None
        if connector is None:
            return NO_ROUTE
        queue_id = body.queue_id
        config = self.snapshot.config
        job = HandOff(connector, envelope, body, config.gateway.hostname, config.timeouts, queue_id)
        outcome = await relay_message(job)
        log.info(
            "message",
            queue_id=queue_id,
            sender=envelope.sender,
            rcpts=len(envelope.recipients),
            size=body.size,
            connector=connector.name,
            tls=outcome.tls,
            result=outcome.reply.text(),
            detail=outcome.detail,
        )
        return outcome.reply


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
    snapshot = Snapshot.of(config)
    limits = ServerLimits(
        max_connections=config.limits.max_connections,
        max_connections_per_ip=config.limits.max_connections_per_ip,
        tls_handshake_timeout=config.timeouts.tls_handshake,
    )

    def handler_factory() -> SessionHandler:
        return GatewayHandler(snapshot)

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
