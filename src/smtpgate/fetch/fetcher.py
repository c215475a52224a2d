"""The POP3 fetch loop: poll each connector's mailboxes, ingest, then delete.

For each POP3 receive connector that runs on this node (its ``roles``, or
every node when it has none), every ``interval`` seconds, mailbox by mailbox:

1. take the mailbox's lease (``fetch.state``); another node holding it: skip;
2. connect, secure and log in (``delivery.pop3``; a demanded STLS that is
   not offered ends the session before the user name is sent);
3. UIDL and LIST; for each message, in the server's order:
   a unique id already ``queued`` is only marked for deletion (a session
   that ended before QUIT left it there); one ``refused`` is left alone;
   one larger than ``limits.max_message_size`` is left (logged once per
   poll); otherwise RETR, hand it to the gateway's ingest
   (``fetch.ingest``), and on 250 record it as ``queued`` — durably — and
   only then DELE it; on 5xx record it as ``refused``; on 4xx leave it for
   the next poll;
4. QUIT, which makes the server delete what was marked; then forget the ids
   no longer in the mailbox.

A session that fails at any step is dropped without QUIT (nothing is
deleted) and tried again at the next poll. Never lost, at worst fetched
twice — and the ``queued`` record makes the second fetch a deletion only.
Each blocking :mod:`poplib` call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from smtpgate.config.schema import Pop3Connector, Pop3Mailbox
from smtpgate.delivery.pop3 import Pop3Error, Pop3Session, mailbox_password
from smtpgate.fetch.ingest import FetchHandler, envelope_sender, received
from smtpgate.fetch.state import FetchState, mailbox_key
from smtpgate.gateway import GatewayState
from smtpgate.inbound.contract import SessionInfo
from smtpgate.observe.log import get_logger
from smtpgate.pools import Pool
from smtpgate.proto.replies import Reply
from smtpgate.queue.queue import Queue
from smtpgate.snapshot import Snapshot
from smtpgate.spool import SpooledBody, new_queue_id

log = get_logger("smtpgate.fetch")

IDLE = 5.0  # seconds between looks at the configuration when nothing is due
# the mailbox conversations and their state, on threads of their own: a slow
# POP3 server never takes the threads the rest of the gateway shares
POOL = Pool("pop3", 4)


class Fetcher:
    """Runs the POP3 connectors of the current configuration."""

    def __init__(
        self,
        current: Callable[[], Snapshot],
        state: GatewayState,
        queue: Queue,
        spool_dir: Path,
        fetch_state: Callable[[], FetchState],
    ) -> None:
        self.current = current
        self.state = state
        self.queue = queue
        self.spool_dir = spool_dir
        self.fetch_state = fetch_state
        self._due: dict[str, float] = {}
        self._stopping = asyncio.Event()
        self.session: Pop3Session | None = None  # the connection in use, for abort()
        self.polls = 0  # completed polls (for tests and status)

    def connectors(self) -> list[Pop3Connector]:
        snapshot = self.current()
        roles = snapshot.roles
        return [
            c
            for c in snapshot.config.receive_connectors.pop3
            if not c.roles or roles.intersection(c.roles)
        ]

    async def run(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            for connector in self.connectors():
                if self._due.get(connector.name, 0.0) <= now:
                    self._due[connector.name] = now + connector.interval
                    await self.poll(connector)
            upcoming = [self._due.get(c.name, 0.0) for c in self.connectors()]
            wait = min([IDLE, *(u - time.monotonic() for u in upcoming)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(wait, 0.05))

    async def stop(self) -> None:
        self._stopping.set()

    def abort(self) -> None:
        """Stopping, and the grace is over: end the POP3 connection in use, so the
        thread waiting on it returns now rather than at its socket timeout (the
        mailbox keeps what was not yet deleted; a queued message's UIDL is kept)."""
        if self.session is not None:
            self.session.interrupt()

    async def poll(self, connector: Pop3Connector) -> None:
        """Every mailbox of ``connector`` once; a failure is logged, never raised."""
        for box in connector.mailboxes:
            try:
                await self.poll_mailbox(connector, box)
            except Exception as exc:  # the next poll tries again
                log.warning(
                    "pop3 fetch failed",
                    connector=connector.name,
                    mailbox=box.username,
                    error=str(exc) if isinstance(exc, Pop3Error) else repr(exc),
                )
        self.polls += 1

    async def poll_mailbox(self, connector: Pop3Connector, box: Pop3Mailbox) -> int:
        """Fetch one mailbox; returns how many messages were queued."""
        snapshot = self.current()
        config = snapshot.config
        key = mailbox_key(connector.name, box.username)
        state = self.fetch_state()
        ttl = max(2 * connector.interval, 120.0)
        if not await POOL.run(state.acquire, key, config.gateway.node, ttl):
            log.debug("pop3 mailbox fetched by another node", connector=connector.name)
            return 0
        password = mailbox_password(config, connector, box)
        session = await POOL.run(Pop3Session.open, config, connector)
        self.session = session
        try:
            await POOL.run(session.login, box.username, password)
            listing = await POOL.run(session.listing)
            seen = await POOL.run(state.seen, key)
            deleted, queued = await self._take(snapshot, connector, box, session, listing, seen)
            await POOL.run(session.quit)
        except BaseException:
            session.abandon()  # no QUIT: nothing marked is deleted
            raise
        finally:
            self.session = None
        present = {uid for _, uid, _ in listing} - deleted
        await POOL.run(state.keep, key, present)
        if queued or deleted:
            log.info(
                "pop3 fetched",
                connector=connector.name,
                mailbox=box.username,
                queued=queued,
                deleted=len(deleted),
                left=len(present),
                tls=session.tls,
            )
        return queued

    async def _take(  # noqa: PLR0913, PLR0917 - one session's messages and where they go
        self,
        snapshot: Snapshot,
        connector: Pop3Connector,
        box: Pop3Mailbox,
        session: Pop3Session,
        listing: list[tuple[int, str, int]],
        seen: Mapping[str, str],
    ) -> tuple[set[str], int]:
        key = mailbox_key(connector.name, box.username)
        state = self.fetch_state()
        limit = snapshot.config.limits.max_message_size
        deleted: set[str] = set()
        queued = too_large = 0
        for number, uid, size in listing:
            mark = seen.get(uid)
            if mark == "queued":  # taken before; the session ended before QUIT
                await POOL.run(session.delete, number)
                deleted.add(uid)
                continue
            if mark == "refused":
                continue
            if size > limit:
                too_large += 1
                continue
            if queued >= connector.max_messages or self._stopping.is_set():
                break
            data = await POOL.run(session.fetch, number)
            reply = await self._ingest(snapshot, connector, box, session, data)
            if reply.code < 300:
                await POOL.run(state.mark, key, uid, "queued")  # before DELE
                await POOL.run(session.delete, number)
                deleted.add(uid)
                queued += 1
            elif reply.code >= 500:
                await POOL.run(state.mark, key, uid, "refused")
                log.warning(
                    "pop3 message refused, left in the mailbox",
                    connector=connector.name,
                    mailbox=box.username,
                    uidl=uid,
                    reply=reply.text(),
                )
        if too_large:
            log.warning(
                "pop3 messages too large, left in the mailbox",
                connector=connector.name,
                mailbox=box.username,
                count=too_large,
                limit=limit,
            )
        return deleted, queued

    async def _ingest(
        self,
        snapshot: Snapshot,
        connector: Pop3Connector,
        box: Pop3Mailbox,
        session: Pop3Session,
        data: bytes,
    ) -> Reply:
        config = snapshot.config
        address = session.peer()
        info = SessionInfo(
            listener=f"pop3:{connector.name}",
            client_ip=address,
            client_port=connector.effective_port,
            hostname=config.gateway.hostname,
            tls=session.tls,
            helo=connector.host,
            esmtp=True,
            sender=envelope_sender(data),
        )
        handler = FetchHandler(snapshot, self.state, self.queue)
        refusal = await handler.take(info, connector.profile, connector.name, box.deliver_to)
        if refusal is not None:
            return refusal
        body = SpooledBody(self.spool_dir, new_queue_id())
        hostname = config.gateway.hostname
        body.write(received(connector.host, address, hostname, connector.name, session.tls))
        body.write(data)
        body.finish()
        return await handler.deliver(info, body)
