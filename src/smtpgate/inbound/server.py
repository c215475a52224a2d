"""Listeners: accept connections, enforce connection limits, run sessions.

Rules kept here:

* A connection beyond ``max_connections`` in total, or beyond
  ``max_connections_per_ip`` from one client address, gets ``421 4.7.0`` and
  is closed before any session starts (Postfix ``smtpd_client_connection_
  count_limit``).
* On a listener with ``proxy_protocol`` the PROXY header is mandatory and the
  limits apply to the address it names; a bad header closes the connection
  without a reply.
* ``implicit-tls`` listeners finish the handshake before the greeting.
* :meth:`InboundServer.stop` stops accepting, answers idle sessions
  ``421 4.3.2`` at once, and gives sessions in the middle of a message
  ``grace`` seconds to finish before they are cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from smtpgate.inbound.proxy import V2_SIGNATURE, ProxyHeaderError, parse_proxy_header
from smtpgate.inbound.session import (
    SHUTTING_DOWN,
    Session,
    SessionHandler,
    SessionInfo,
    SessionSettings,
    tls_summary,
)
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
    proxy_protocol: bool
    session: SessionSettings


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int
    max_connections_per_ip: int
    proxy_header_timeout: float
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
        self.handler_factory = handler_factory
        self.limits = limits
        self.hostname = hostname
        self.sessions: dict[Session, asyncio.Task[None]] = {}
        self.per_ip: Counter[str] = Counter()
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        for spec in self.specs:
            server = await asyncio.start_server(
                self._acceptor(spec),
                spec.host,
                spec.port,
                ssl=spec.implicit_tls,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout
                if spec.implicit_tls
                else None,
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(server)
            log.info("listening", listener=spec.name, address=f"{spec.host}:{spec.port}")

    def _acceptor(
        self, spec: ListenerSpec
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._accept(reader, writer, spec)

        return accept

    def bound_ports(self) -> dict[str, int]:
        """Listener name → the port actually bound (useful with port 0)."""
        ports = {}
        for spec, server in zip(self.specs, self._servers, strict=True):
            ports[spec.name] = server.sockets[0].getsockname()[1]
        return ports

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: ListenerSpec
    ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        client = (str(peer[0]), int(peer[1]))
        if spec.proxy_protocol:
            proxied = await self._read_proxy_header(reader)
            if proxied is None:
                writer.close()
                return
            client = proxied if proxied != ("", 0) else client
        refusal = self._over_limit(client[0])
        if refusal is not None:
            writer.write(refusal.to_bytes())
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            log.info(
                "connection refused", listener=spec.name, client=client[0], reply=refusal.text()
            )
            return
        await self._run_session(reader, writer, spec, client)

    def _over_limit(self, ip: str) -> Reply | None:
        if len(self.sessions) >= self.limits.max_connections:
            return TOO_MANY
        if self.per_ip[ip] >= self.limits.max_connections_per_ip:
            return TOO_MANY_FROM_YOU
        return None

    async def _run_session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        spec: ListenerSpec,
        client: tuple[str, int],
    ) -> None:
        info = SessionInfo(spec.name, client[0], client[1], self.hostname, tls=tls_summary(writer))
        session = Session(
            reader,
            writer,
            info,
            self.handler_factory(),
            spec.session,
            tls_active=spec.implicit_tls is not None,
        )
        task = asyncio.current_task()
        assert task is not None
        self.sessions[session] = task
        self.per_ip[client[0]] += 1
        try:
            await session.run()
        finally:
            del self.sessions[session]
            self.per_ip[client[0]] -= 1
            if self.per_ip[client[0]] <= 0:
                del self.per_ip[client[0]]

    async def _read_proxy_header(self, reader: asyncio.StreamReader) -> tuple[str, int] | None:
        """The client named by the PROXY header, ("", 0) for LOCAL, None if bad."""
        try:
            async with asyncio.timeout(self.limits.proxy_header_timeout):
                head = await reader.readexactly(12)
                if head == V2_SIGNATURE:
                    fixed = await reader.readexactly(4)
                    length = int.from_bytes(fixed[2:4], "big")
                    data = head + fixed + await reader.readexactly(length)
                elif head.startswith(b"PROXY "):
                    data = head + await reader.readuntil(b"\n")
                else:
                    return None
            parsed = parse_proxy_header(data)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ProxyHeaderError,
            OSError,
        ):
            return None
        if parsed is None or parsed.header_length != len(data):
            return None
        return parsed.client or ("", 0)

    async def stop(self, grace: float) -> None:
        """Stop accepting; let sessions inside a message finish within ``grace``."""
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            if session.request_stop():
                session.writer.write(session.conn.close_with(SHUTTING_DOWN))
                session.writer.close()
        tasks = list(self.sessions.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
