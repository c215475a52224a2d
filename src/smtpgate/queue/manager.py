"""The queue manager: due recipients → routes → attempts → outcomes → reports.

Rules kept here:

* Each due recipient is routed afresh (the cheapest matching send
  connector, as at RCPT); recipients of one message that share a connector
  and a destination go in one attempt. A permanent failure bounces: no
  dearer connector is tried. Only a connector with
  ``failover_when_unreachable`` lets the next one try, and only when no
  server could be reached at all, or when the connector is known to be down
  for the destination (``delivery/health.py``: skipped until a probe is due).
* Outcomes: 2xx delivered, 4xx or no reply deferred (exponential backoff
  with jitter), 5xx bounced; past ``retry.lifetime`` a deferred recipient
  bounces (4.4.7). The pure :func:`~smtpgate.queue.schedule.decide` makes
  each recipient's decision; the manager applies it.
* A run that raises is a failed attempt like any other (4.3.0, counted,
  backed off), never a busy loop.
* Reports (RFC 3464) go to the sender as NOTIFY asks; a report that cannot
  be delivered goes to ``gateway.admin_address``; one to the administrator
  that fails is logged and dropped. Reports re-enter through ingest.
* Attempts run under a global limit and the destination's shaping
  (``queue/shaping.py``: concurrency with feedback, messages per
  connection, rate), off the inbound path: a slow destination never slows
  the listeners.
* Time comes from the queue's :class:`~smtpgate.queue.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smtpgate.config.schema import QueueSettings, SendConnector
from smtpgate.delivery.attempt import AttemptReport, Deliverer, Job
from smtpgate.delivery.health import ConnectorHealth, failed, skipped, status_path
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.observe import events
from smtpgate.observe.log import get_logger
from smtpgate.queue.clock import Clock
from smtpgate.queue.dsn import (
    RETURN_LIMIT,
    Report,
    ReportedRecipient,
    build_report,
    wants_report,
)
from smtpgate.queue.queue import Queue
from smtpgate.queue.schedule import (
    EXPIRED_STATUS,
    Outcome,
    backoff,
    decide,
    enhanced_status,
    expired,
)
from smtpgate.queue.shaping import Shaper
from smtpgate.queue.states import ATTEMPTABLE, MessageKind, RecipientState
from smtpgate.queue.store import Fresh, QueuedMessage, QueuedRecipient, RecipientUpdate
from smtpgate.snapshot import Snapshot
from smtpgate.spool import SpooledBody, StoredBody, new_queue_id

log = get_logger("smtpgate.queue")

POLL = 1.0  # how often to look for changes made by the queue tools


@dataclass
class _Result:
    updates: list[RecipientUpdate] = field(default_factory=list)
    reported: list[ReportedRecipient] = field(default_factory=list)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class _BodyReads:
    """Body reads asked for in the same turn of the event loop share one trip to
    the queue's thread (a scan starts every due message at once: one executor
    hop for all of them, not one each). Every reader gets its own result, or the
    exception its own read raised."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._waiting: list[tuple[str, asyncio.Future[bytes | Path | None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(self, message_id: str) -> bytes | Path | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | Path | None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._start)
        self._waiting.append((message_id, future))
        return await future

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._read(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, batch: list[tuple[str, asyncio.Future[bytes | Path | None]]]) -> None:
        def work() -> list[tuple[bytes | Path | None, Exception | None]]:
            found: list[tuple[bytes | Path | None, Exception | None]] = []
            for message_id, _ in batch:
                try:
                    found.append((store.body(message_id), None))
                except Exception as exc:  # that reader's failure, as if read alone
                    found.append((None, exc))
            return found

        try:
            store = self._queue.store
            results = await self._queue.call(work)
        except BaseException as exc:  # the hop itself failed: every reader hears of it
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), (data, error) in zip(batch, results, strict=True):
            if future.done():  # its reader was cancelled meanwhile
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(data)


class QueueManager:
    def __init__(
        self,
        queue: Queue,
        deliverer: Deliverer,
        current: Callable[[], Snapshot],
        hostname: str,
        clock: Clock | None = None,  # None: the queue's
    ) -> None:
        self.queue = queue
        self.clock = clock or queue.clock
        self.deliverer = deliverer
        self.current = current  # the running configuration, read at each use
        self.hostname = hostname
        settings = self.settings
        self.jitter: Callable[[], float] = random.random
        self._inflight: set[str] = set()
        # Messages whose last run raised, and until when they rest: a run that fails
        # before it can record anything must not make the message due again at once.
        self._resting: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._bodies = _BodyReads(queue)
        workers = queue.owner.count  # worker processes delivering side by side: a share each
        self._slots = asyncio.Semaphore(max(1, settings.max_deliveries // workers))
        self.shaper = Shaper(lambda: self.settings, share=workers)  # per destination
        deliverer.per_connection = lambda job: self.shaper.per_connection(
            job.connector.name, self._destination(job.connector, f"x@{job.domain}")
        )
        self._stopping = asyncio.Event()
        board = status_path(queue.directory.parent, queue.owner.index)  # per worker
        self.health = ConnectorHealth(self._health_settings, board)

    @property
    def settings(self) -> QueueSettings:
        return self.current().config.queue

    def _health_settings(self) -> tuple[int, float]:
        settings = self.settings.connector_health
        return settings.down_after, settings.probe_interval

    @property
    def admin_address(self) -> str | None:
        return self.current().config.gateway.admin_address

    def route(
        self, sender: str, recipient: str, exclude: frozenset[str] = frozenset()
    ) -> SendConnector | None:
        return self.current().route(sender, recipient, exclude)

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        self.queue.hand_off = self._take  # new messages come straight here, not by a scan
        try:
            while not self._stopping.is_set():
                try:
                    wait = await self._run_once()
                except Exception as exc:
                    log.error("queue scan failed", error=repr(exc))
                    wait = POLL
                self.queue.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.01)):
                        await self._wake()
        finally:
            self.queue.hand_off = None

    def _take(self, fresh: Fresh) -> None:
        """A message the queue just made durable, with its body: attempted now."""
        if not self._stopping.is_set():  # else the next start's scan finds it
            self._start(fresh.message, fresh.body)

    async def _run_once(self) -> float:
        """Start attempts for what is due; returns how long to sleep at most."""
        store = self.queue.store
        now = self.clock.now()
        self._resting = {k: until for k, until in self._resting.items() if until > now}
        inflight = self._inflight | self._resting.keys() | self.queue.handing
        due, following = await self.queue.call(lambda: store.due_and_next(now, inflight))
        for message in due:  # never one being handed off: `handing` is excluded
            self._start(message)
        return POLL if following is None else min(POLL, max(0.0, following - self.clock.now()))

    async def _wake(self) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        change = asyncio.ensure_future(self.queue.changed.wait())
        try:
            await asyncio.wait({stop, change}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            change.cancel()

    async def stop(self, grace: float) -> None:
        self._stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.deliverer.close()

    def _start(self, message: QueuedMessage, body: bytes | Path | None = None) -> None:
        self._inflight.add(message.id)
        task = asyncio.get_running_loop().create_task(self._process(message, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one message -------------------------------------------------------------

    async def _process(self, message: QueuedMessage, body: bytes | Path | None) -> None:
        now = self.clock.now()
        due = [r for r in message.recipients if r.state in ATTEMPTABLE and r.next_attempt <= now]
        try:
            outcome = await self._attempt_due(message, due, now, body)
        except Exception as exc:
            log.error("queue run failed", queue_id=message.id, error=repr(exc))
            await self._defer_after_failure(message, due, exc)
            self._inflight.discard(message.id)
            return
        try:
            if outcome is not None:
                result, original = outcome
                if result.updates:
                    await self.queue.apply(result.updates)  # may delete the message
                await self._report(message, result.reported, original)
        except Exception as exc:
            log.error("cannot record the outcome", queue_id=message.id, error=repr(exc))
            self._rest(message.id)
        finally:
            self._inflight.discard(message.id)

    async def _attempt_due(
        self,
        message: QueuedMessage,
        due: list[QueuedRecipient],
        now: float,
        body_data: bytes | Path | None,
    ) -> tuple[_Result, bytes] | None:
        """Deliver (or expire) the due recipients; None if the message is gone.
        ``body_data`` is the body handed off with a new message (else read)."""
        data = body_data if body_data is not None else await self._bodies.read(message.id)
        if data is None:
            return None  # deleted meanwhile (queue tools)
        body = StoredBody(data)  # read once: for every attempt and for reports
        result = _Result()
        for r in message.recipients:
            if r.state is RecipientState.BOUNCE:  # `smtpgate queue bounce`
                text = "5.0.0 bounced by the administrator"
                self._outcome(message, r, 550, text, None, result)
        if expired(message.arrival, now, self.settings.retry):
            self._expire(message, due, now, result)
        else:
            await self._deliver(message, due, body, result)
        return result, body.head(RETURN_LIMIT) if result.reported else b""

    def _rest(self, queue_id: str) -> None:
        """Keep a message out of the scans for the first retry interval (in memory)."""
        first = backoff(1, self.settings.retry, self.jitter())
        self._resting[queue_id] = self.clock.now() + first

    async def _defer_after_failure(
        self, message: QueuedMessage, due: list[QueuedRecipient], exc: Exception
    ) -> None:
        """A run that raised is a failed attempt like any other: 4.3.0, counted, backed
        off. If even that cannot be recorded (the store is failing), the message rests
        in memory for the first retry interval: no failure becomes a busy loop."""
        self._rest(message.id)
        result = _Result()
        for r in due:
            text = f"4.3.0 internal error during delivery ({type(exc).__name__})"
            self._outcome(message, r, None, text, None, result)
        try:
            if result.updates:
                await self.queue.apply(result.updates)
            self._resting.pop(message.id, None)  # recorded: the backoff is in the store
        except Exception as again:
            log.error("cannot record the failed run", queue_id=message.id, error=repr(again))

    def _expire(
        self, message: QueuedMessage, due: list[QueuedRecipient], now: float, result: _Result
    ) -> None:
        """Bounce the due recipients of a message past its lifetime, unattempted."""
        for r in due:
            last = r.last_reply or "none"
            text = f"{EXPIRED_STATUS} message expired in the queue; last reply: {last}"
            result.updates.append(
                RecipientUpdate(message.id, r.idx, RecipientState.BOUNCED, text, now, False)
            )
            self._publish(message, r, None, text, None, RecipientState.BOUNCED, "-")
            result.reported.append(
                ReportedRecipient(
                    r.address, r.params.orcpt, "failed", EXPIRED_STATUS, r.last_reply, None, now
                )
            )

    async def _deliver(
        self, message: QueuedMessage, due: list[QueuedRecipient], body: StoredBody, result: _Result
    ) -> None:
        groups: dict[tuple[str, str], tuple[SendConnector, list[QueuedRecipient]]] = {}
        for r in due:
            connector = self.route(message.sender, r.address, frozenset())
            if connector is None:
                self._outcome(message, r, None, "4.3.5 no send connector matches", None, result)
                continue
            key = (connector.name, self._destination(connector, r.address))
            groups.setdefault(key, (connector, []))[1].append(r)
        attempts = [
            self._attempt(message, connector, rcpts, key[1], body=body, result=result)
            for key, (connector, rcpts) in groups.items()
        ]
        if len(attempts) == 1:  # the usual case: no task of its own for gather
            await attempts[0]
        else:
            await asyncio.gather(*attempts)

    @staticmethod
    def _destination(connector: SendConnector, address: str) -> str:
        smarthost = connector.deliver.smarthost
        return f"{smarthost.host}:{smarthost.port}" if smarthost else _domain(address)

    async def _attempt(  # noqa: PLR0913 - one destination's attempt and where it reports
        self,
        message: QueuedMessage,
        connector: SendConnector,
        rcpts: list[QueuedRecipient],
        destination: str,
        *,
        body: StoredBody,
        result: _Result,
    ) -> None:
        tried: set[str] = set()
        while True:
            tried.add(connector.name)
            report = await self._try(message, connector, rcpts, destination, body)
            if report.reached or not connector.failover_when_unreachable:
                break
            following = self.route(message.sender, rcpts[0].address, frozenset(tried))
            if following is None:
                break
            log.info(
                "failover",
                queue_id=message.id,
                from_connector=connector.name,
                to_connector=following.name,
            )
            connector = following
            destination = self._destination(connector, rcpts[0].address)
        by_idx = {r.idx: r for r in rcpts}
        for outcome in report.outcomes:
            self._outcome(
                message,
                by_idx[outcome.idx],
                outcome.code,
                outcome.text,
                report,
                result,
                connector.name,
            )

    async def _try(
        self,
        message: QueuedMessage,
        connector: SendConnector,
        rcpts: list[QueuedRecipient],
        destination: str,
        body: StoredBody,
    ) -> AttemptReport:
        """An attempt, recorded in the connector's health; a connector with failover
        that is down for the destination is skipped until its probe is due."""
        name = connector.name
        if connector.failover_when_unreachable and not self.health.allow(name, destination):
            return skipped(name, destination, self.health, [r.idx for r in rcpts])
        report = await self._run(message, connector, rcpts, destination, body)
        error = failed(report)
        self.health.record(name, destination, ok=error is None, error=error or "")
        return report

    async def _run(
        self,
        message: QueuedMessage,
        connector: SendConnector,
        rcpts: list[QueuedRecipient],
        destination: str,
        body: StoredBody,
    ) -> AttemptReport:
        job = Job(
            connector,
            message.sender,
            message.mail_params,
            [(r.idx, Recipient(r.address, r.params)) for r in rcpts],
            body,
            _domain(rcpts[0].address),
            self.current(),
        )
        asked = time.monotonic()
        # the destination's slot (and rate) first: waiting for it holds no global slot
        async with self.shaper.slot(connector.name, destination), self._slots:
            started = time.monotonic()
            report = await self.deliverer.attempt(job)
        took = time.monotonic() - started
        await self.shaper.feedback(connector.name, destination, report)
        return dataclasses.replace(report, waited=started - asked, took=took)

    def _outcome(  # noqa: PLR0913, PLR0917 - one recipient's outcome and its context
        self,
        message: QueuedMessage,
        r: QueuedRecipient,
        code: int | None,
        text: str,
        report: AttemptReport | None,
        result: _Result,
        connector: str = "-",
    ) -> None:
        """Record what ``schedule.decide`` makes of one recipient's reply."""
        now = self.clock.now()
        reply = f"{code} {text}" if code is not None and not text.startswith(str(code)) else text
        remote = report.remote if report else None
        passed_on = report.dsn_passed_on if report else None
        outcome = Outcome(code, r.attempts, message.arrival, r.warned, r.params.notify, passed_on)
        decision = decide(outcome, now, self.settings, self.jitter())
        if decision.report is not None:
            status = enhanced_status(text, code)
            result.reported.append(
                ReportedRecipient(
                    r.address, r.params.orcpt, decision.report, status, reply, remote, now
                )
            )
        state, next_attempt, warned = decision.state, decision.next_attempt, decision.warned
        result.updates.append(
            RecipientUpdate(message.id, r.idx, state, reply, next_attempt, True, warned)
        )
        self._publish(message, r, code, reply, report, state, connector)
        log.info(
            "delivery",
            queue_id=message.id,
            rcpt=r.address,
            state=state,
            connector=connector,
            relay=remote,
            tls=report.tls if report else None,
            verified=(report.verified_by or report.verified) if report else False,
            reply=reply,
            attempts=r.attempts + 1,
        )

    def _publish(  # noqa: PLR0913, PLR0917 - one recipient's outcome and its context
        self,
        message: QueuedMessage,
        r: QueuedRecipient,
        code: int | None,
        reply: str,
        report: AttemptReport | None,
        state: RecipientState,
        connector: str,
    ) -> None:
        """The mail event of one recipient's attempt (log line, metrics, tracking)."""
        delay = max(0.0, self.clock.now() - message.arrival)
        dsn = enhanced_status(reply, code)
        if code is not None and code < 300 and not dsn.startswith("2"):
            dsn = "2.0.0"
        waited = report.waited if report else 0.0
        took = report.took if report else 0.0
        transmit = min(report.transmit, took) if report else 0.0
        before = max(0.0, delay - waited - took)
        status: events.Status = (
            "sent"
            if state is RecipientState.DELIVERED
            else "bounced"
            if state in (RecipientState.BOUNCED, RecipientState.BOUNCE)
            else "deferred"
        )
        events.publish(
            events.DeliveryAttempt(
                message.id, r.address, connector, (report.relay if report else None) or "none",
                delay, (before, waited, took - transmit, transmit), dsn, status, reply,
                report.tls if report and report.relay else None,
                bool(report and report.verified), r.attempts + 1,
                verified_by=report.verified_by if report else "",
            )
        )  # fmt: skip

    # -- reports -----------------------------------------------------------------

    async def _report(
        self, message: QueuedMessage, reported: list[ReportedRecipient], original: bytes
    ) -> None:
        by_action: dict[str, list[ReportedRecipient]] = {}
        notify = {r.address: r.params.notify for r in message.recipients}
        for item in reported:
            if message.kind is not MessageKind.MAIL or wants_report(
                notify.get(item.address), item.action
            ):
                by_action.setdefault(item.action, []).append(item)
        for action, items in by_action.items():
            if message.kind is MessageKind.MAIL and not message.sender:
                continue  # never report on a message with the null sender
            if message.kind is MessageKind.ADMIN_REPORT or (
                message.kind is MessageKind.REPORT and action != "failed"
            ):
                log.warning("report undeliverable, dropped", queue_id=message.id, action=action)
                continue
            await self._send_report(message, action, items, original)

    async def _send_report(
        self, message: QueuedMessage, action: str, items: list[ReportedRecipient], original: bytes
    ) -> None:
        to_admin = message.kind is MessageKind.REPORT
        recipient = self.admin_address if to_admin else message.sender
        if not recipient:
            log.warning("report has nowhere to go", queue_id=message.id)
            return
        params = message.mail_params
        until = message.arrival + self.settings.retry.lifetime
        report = Report(
            self.hostname,
            message.id,
            recipient,
            message.arrival,
            params.envid,
            params.ret,
            tuple(items),
            until if action == "delayed" else None,
        )
        body = SpooledBody(self.queue.directory, new_queue_id())
        body.write(build_report(report, original, message.size, self.clock.now()))
        body.finish()
        envelope = Envelope(sender="", recipients=(Recipient(recipient),))
        kind = MessageKind.ADMIN_REPORT if to_admin else MessageKind.REPORT
        queue_id = await self.queue.ingest(envelope, body, kind)
        log.info("report queued", queue_id=queue_id, about=message.id, action=action, to=recipient)
        events.publish(events.DsnSent(queue_id, message.id, action, recipient))
