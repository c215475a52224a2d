"""Listeners: accept connections, enforce connection limits, stop gracefully.

Rules kept here:

* A connection beyond ``max_connections`` in total, or beyond
  ``max_connections_per_ip`` from one client address, gets ``421 4.7.0`` and
  is closed before any greeting (counted over every worker process of the
  gateway, ``inbound/counts.py``) (Postfix ``smtpd_client_connection_count_
  limit``). On a PROXY-protocol listener the limits apply to the address the
  header names; a connection without a valid header is closed silently.
* The last ``reserved_connections`` of ``max_connections`` are kept for known
  clients (``known_client``: for the gateway, an address that a connection
  profile names by IP or CIDR, since that is known before any read), so
  partners and internal servers still get in while anonymous clients flood.
* Refusals are logged by :class:`RefusalLog`: the first per client address
  with its reply and reason, then one summary per address and interval, so
  a flood of refused connections writes a few lines, not one per connection.
* ``implicit-tls`` listeners finish the handshake before the greeting.
* :meth:`InboundServer.stop` stops accepting, answers idle sessions
  ``421 4.3.2`` at once, and gives sessions inside a message ``grace``
  seconds to finish before they are cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from smtpgate.inbound.contract import SessionHandler, SessionSettings
from smtpgate.inbound.counts import ConnectionCounts, LocalCounts
from smtpgate.inbound.session import Session, wait_closed
from smtpgate.observe import events
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
    reserved_connections: int = 0  # of max_connections, only for known clients


@dataclass
class _Refused:
    since: float  # when the current interval began
    count: int = 0  # refusals since then that were not logged one by one


@dataclass
class RefusalLog:
    """Log refused connections without flooding the log.

    The first refusal from an address is logged in full (``connection
    refused``, with the reply and the reason); further ones are counted, and
    once per ``interval`` each address with a count gets one line
    (``connections refused``: count, client, seconds). An address with no
    refusal for a whole interval is forgotten, so its next refusal is logged in
    full again. At most ``max_addresses`` are tracked; refusals from more
    are counted under ``client="other"``. ``clock`` is a parameter for tests.
    """

    interval: float = 60.0
    clock: Callable[[], float] = time.monotonic
    max_addresses: int = 10_000
    _seen: dict[str, _Refused] = field(default_factory=dict)
    _timer: asyncio.TimerHandle | None = None

    def refused(self, client: str, reply: Reply, why: str, **facts: str) -> None:
        ip, now = client, self.clock()
        self.flush(now)
        entry = self._seen.get(client)
        if entry is None and len(self._seen) >= self.max_addresses:
            client, entry = "other", self._seen.setdefault("other", _Refused(now))
        first = entry is None
        if entry is None:
            self._seen[client] = _Refused(now)
            log.info("connection refused", client=client, reply=reply.text(), why=why, **facts)
        else:
            entry.count += 1
        self._schedule()
        who = events.Client(
            ip, listener=facts.get("listener", ""), profile=facts.get("profile", "")
        )
        text = reply.text()
        events.publish(
            events.Refused("CONNECT", who, reply.code, reply.status, text, why, first=first)
        )

    def flush(self, now: float | None = None) -> None:
        """Write the summaries of intervals that have ended."""
        now = self.clock() if now is None else now
        for client, entry in list(self._seen.items()):
            if now - entry.since < self.interval:
                continue
            if entry.count == 0:
                del self._seen[client]
                continue
            seconds = round(now - entry.since)
            log.info("connections refused", client=client, count=entry.count, seconds=seconds)
            entry.since, entry.count = now, 0

    def _schedule(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()
        if self._seen:
            self._schedule()

    def close(self) -> None:
        """Write what is counted and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush(self.clock() + self.interval)


class InboundServer:
    """All listeners of one gateway and the sessions they run."""

    def __init__(  # noqa: PLR0913 - keyword-only wiring of the composition root
        self,
        specs: list[ListenerSpec],
        handler_factory: Callable[[], SessionHandler],
        limits: ServerLimits,
        hostname: str,
        *,
        known_client: Callable[[str], bool] = lambda _ip: False,
        sockets: dict[str, list[socket.socket]] | None = None,
        counts: ConnectionCounts | None = None,
    ) -> None:
        self.specs = specs
        # bound by the supervisor and shared by every worker (None: bind them here)
        self.bound = sockets
        self.new_handler = handler_factory
        self.limits = limits
        self.hostname = hostname
        self.known_client = known_client  # may use the reserved connections
        self.refusals = RefusalLog()
        self.sessions: set[Session] = set()
        # open connections in total and per client address: this process's own,
        # or shared by every worker process of the gateway (inbound/counts.py)
        self.counts: ConnectionCounts = counts if counts is not None else LocalCounts()
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for spec in self.specs:
            handshake = self.limits.tls_handshake_timeout if spec.implicit_tls else None
            if self.bound is not None:  # one server per socket the supervisor bound
                for sock in self.bound[spec.name]:
                    server = await loop.create_server(
                        self._factory(spec),
                        sock=sock,
                        ssl=spec.implicit_tls,
                        ssl_handshake_timeout=handshake,
                        backlog=1024,
                    )
                    self._servers.append(server)
                continue
            server = await loop.create_server(
                self._factory(spec),
                spec.host,
                spec.port,
                ssl=spec.implicit_tls,
                ssl_handshake_timeout=handshake,
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(server)
            log.info("listening", listener=spec.name, address=f"{spec.host}:{spec.port}")

    def _factory(self, spec: ListenerSpec) -> Callable[[], Session]:
        loop = asyncio.get_running_loop()  # looked up once, not per connection

        def make() -> Session:
            return Session(self, spec.name, spec.session, loop)

        return make

    def bound_ports(self) -> dict[str, int]:
        """Listener name → the port actually bound (useful with port 0)."""
        if self.bound is not None:
            return {
                spec.name: int(self.bound[spec.name][0].getsockname()[1]) for spec in self.specs
            }
        return {
            spec.name: int(server.sockets[0].getsockname()[1])
            for spec, server in zip(self.specs, self._servers, strict=True)
        }

    # -- SessionHost -----------------------------------------------------------

    def admit(self, session: Session) -> Reply | None:
        ip = session.info.client_ip
        why = self.counts.try_add(ip, known=self.known_client(ip), limits=self.limits)
        if why is not None:
            reply, reason = self._refusal(why)
            self.refusals.refused(ip, reply, reason, listener=session.listener)
            return reply
        self.sessions.add(session)
        return None

    def _refusal(self, why: str) -> tuple[Reply, str]:
        limits = self.limits
        if why == "total":
            return TOO_MANY, f"limits.max_connections ({limits.max_connections}) reached"
        if why == "reserved":
            reserved = limits.reserved_connections
            return TOO_MANY, f"the last {reserved} connections are reserved for known clients"
        limit = limits.max_connections_per_ip
        return TOO_MANY_FROM_YOU, f"limits.max_connections_per_ip ({limit}) reached"

    def forget(self, session: Session) -> None:
        if session in self.sessions:  # admitted: counted
            self.sessions.discard(session)
            self.counts.remove(session.info.client_ip)

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
        self.refusals.close()


def stop_requested() -> asyncio.Event:
    """An event set when SIGTERM or SIGINT arrives (the graceful-shutdown request).
    Installed first thing, so a stop that comes while the gateway is still
    starting is a graceful stop once it has started, not the default death."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    return stop


async def until_stop_signal() -> None:
    """Return when SIGTERM or SIGINT arrives."""
    await stop_requested().wait()
