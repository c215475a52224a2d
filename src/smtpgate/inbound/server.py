"""Listeners: accept connections, enforce connection limits, stop gracefully.

Rules kept here:

* A connection beyond ``max_connections`` in total, or beyond
  ``max_connections_per_ip`` from one client address, gets ``421 4.7.0`` and
  is closed before any greeting (Postfix ``smtpd_client_connection_count_
  limit``). On a PROXY-protocol listener the limits apply to the address the
  header names; a connection without a valid header is closed silently.
* ``implicit-tls`` listeners finish the handshake before the greeting.
* :meth:`InboundServer.stop` stops accepting, answers idle sessions
  ``421 4.3.2`` at once, and gives sessions inside a message ``grace``
  seconds to finish before they are cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from smtpgate.inbound.contract import SessionHandler, SessionSettings
from smtpgate.inbound.session import Session, wait_closed
from smtpgate.observe.log import get_logger
from smtpgate.proto.replies import Reply

log = get_logger("smtpgate.inbound")

TOO_MANY = Reply.of(421, "4.7.0", "Error: too many connections, try again later")
TOO_MANY_FROM_YOU = Reply.of(421, "4.7.0", "Error: too many connections from your address")


@dataclass(frozen=True)
class ListenerSpec:
    """One listening socket and how its sessions behave."""

    name: str
    host: str
    port: int
    implicit_tls: ssl.SSLContext | None
    session: SessionSettings


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int
    max_connections_per_ip: int
    tls_handshake_timeout: float


class InboundServer:
    """All listeners of one gateway and the sessions they run."""

    def __init__(
        self,
        specs: list[ListenerSpec],
        handler_factory: Callable[[], SessionHandler],
        limits: ServerLimits,
        hostname: str,
    ) -> None:
        self.specs = specs
        self.new_handler = handler_factory
        self.limits = limits
        self.hostname = hostname
        self.sessions: set[Session] = set()
        self.per_ip: Counter[str] = Counter()
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for spec in self.specs:
            server = await loop.create_server(
                self._factory(spec),
                spec.host,
                spec.port,
                ssl=spec.implicit_tls,
                ssl_handshake_timeout=(
                    self.limits.tls_handshake_timeout if spec.implicit_tls else None
                ),
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(server)
            log.info("listening", listener=spec.name, address=f"{spec.host}:{spec.port}")

    def _factory(self, spec: ListenerSpec) -> Callable[[], Session]:
        def make() -> Session:
            return Session(self, spec.name, spec.session)

        return make

    def bound_ports(self) -> dict[str, int]:
        """Listener name → the port actually bound (useful with port 0)."""
        return {
            spec.name: int(server.sockets[0].getsockname()[1])
            for spec, server in zip(self.specs, self._servers, strict=True)
        }

    # -- SessionHost -----------------------------------------------------------

    def admit(self, session: Session) -> Reply | None:
        ip = session.info.client_ip
        if len(self.sessions) >= self.limits.max_connections:
            return TOO_MANY
        if self.per_ip[ip] >= self.limits.max_connections_per_ip:
            return TOO_MANY_FROM_YOU
        self.sessions.add(session)
        self.per_ip[ip] += 1
        return None

    def forget(self, session: Session) -> None:
        self.sessions.discard(session)
        ip = session.info.client_ip
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    # -- shutdown --------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Stop accepting; let sessions inside a message finish within ``grace``."""
        for server in self._servers:
            server.close()
        sessions = list(self.sessions)
        for session in sessions:
            session.request_stop()
        for session in await wait_closed(sessions, grace):
            if session.transport is not None:
                session.transport.abort()
        await wait_closed(sessions, 5)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()


async def until_stop_signal() -> None:
    """Return when SIGTERM or SIGINT arrives (the graceful-shutdown request)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
