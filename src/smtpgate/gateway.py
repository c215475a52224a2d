"""The gateway's session handler: connection profiles, TLS, relay, AUTH, hand-off.

A session keeps the :class:`~smtpgate.snapshot.Snapshot` that was current
when it started, to its end; ``GatewayHandler`` asks the pure policy
functions at each step (connect, MAIL, RCPT, AUTH) and hands accepted
messages on. Decisions are logged with their reasons; secrets never are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field

from smtpgate.config.schema import GatewayConfig
from smtpgate.content import registry
from smtpgate.content.apply import write_verdicts
from smtpgate.content.dkimsign import sign_outbound
from smtpgate.content.pipeline import MessageFacts, Scanner, scan
from smtpgate.content.quarantine import Quarantine
from smtpgate.content.recipients import RecipientValidator
from smtpgate.content.senderauth import forged_results
from smtpgate.content.verdict import ACCEPTED, Outcome
from smtpgate.dns import DnsResolver, Resolver, confirmed_names
from smtpgate.errors import QueueError
from smtpgate.inbound.contract import Pending, SessionInfo
from smtpgate.inbound.sasl import MECHANISMS
from smtpgate.inbound.server import RefusalLog
from smtpgate.model.envelope import Envelope
from smtpgate.observe import events
from smtpgate.observe.log import get_logger
from smtpgate.policy.auth import (
    AUTHENTICATED,
    BAD_CREDENTIALS,
    LOCKED_OUT,
    AuthThrottle,
    Throttle,
)
from smtpgate.policy.profile import (
    ProfileMatch,
)
from smtpgate.policy.session import ListenerFacts, SessionPolicy
from smtpgate.proto import events as ev
from smtpgate.proto.replies import Reply
from smtpgate.queue.queue import Queue
from smtpgate.snapshot import Snapshot
from smtpgate.spool import SpooledBody

log = get_logger("smtpgate.gateway")

HEAD_FOR_MESSAGE_ID = 16 * 1024  # the Message-ID is read from this much of the head
QUEUE_FAILED = Reply.of(451, "4.3.0", "Error: queue file write error, try again later")
QUARANTINE_UNAVAILABLE = Reply.of(451, "4.3.0", "Message held for review, but no quarantine here")


@dataclass
class GatewayState:
    """What outlives one configuration: the AUTH throttle and the resolver."""

    throttle: Throttle  # this process's, or shared by every worker process
    resolver: Resolver
    refusals: RefusalLog = field(default_factory=RefusalLog)  # blocked clients
    scanners: list[Scanner] = field(default_factory=list)  # content checks before the 250
    quarantine: Quarantine | None = None  # where held messages go (content.quarantine)
    recipients: RecipientValidator = field(default_factory=RecipientValidator)  # at RCPT

    @classmethod
    def for_config(cls, config: GatewayConfig) -> GatewayState:
        resolver = DnsResolver(config.gateway.dns)
        return cls(AuthThrottle(config.limits), resolver, scanners=registry.scanners())

    def now(self) -> float:
        return asyncio.get_running_loop().time()


class GatewayHandler:
    """Per-session policy and hand-off for the gateway."""

    def __init__(self, policy: Snapshot, state: GatewayState, queue: Queue) -> None:
        self.policy = policy  # the snapshot current when the session started, kept to its end
        self.state = state
        self.queue = queue
        self.session = SessionPolicy(
            policy.config, policy.profiles, policy.auth_enabled, policy.hosted, policy.postmaster
        )
        self.client_names: tuple[str, ...] = ()  # forward-confirmed, when profiles needed them

    @property
    def match(self) -> ProfileMatch:
        return self.session.match

    def client(self, info: SessionInfo) -> events.Client:
        """The session's facts for the mail events."""
        name = self.client_names[0] if self.client_names else "unknown"
        return events.Client(
            info.client_ip, name, info.listener, info.profile, info.helo, info.esmtp, info.tls
        )

    def refused(  # noqa: PLR0913 - the refusal and where it happened
        self,
        stage: events.Stage,
        info: SessionInfo,
        reply: Reply,
        why: str,
        *,
        sender: str | None = None,
        recipient: str | None = None,
        queue_id: str = "",
    ) -> None:
        client = self.client(info)
        sender = info.sender if sender is None and stage != "MAIL" else sender
        found = events.Refused(
            stage, client, reply.code, reply.status, reply.text(), why, sender, recipient,
            queue_id,
        )  # fmt: skip
        events.publish(found)

    # -- connect -------------------------------------------------------------

    def on_connect(self, info: SessionInfo) -> Reply | Pending | None:
        if self.policy.profiles.uses_host_names:  # a profile names hosts: DNS first
            return Pending(self._connect_named(info))
        return self._connect(info, [])

    async def _connect_named(self, info: SessionInfo) -> Reply | None:
        return self._connect(info, await confirmed_names(self.state.resolver, info.client_ip))

    def _connect(self, info: SessionInfo, names: list[str]) -> Reply | None:
        listener = ListenerFacts(
            info.listener, info.tls_required, info.client_certificate_required
        )  # as the listener runs: a changed security waits for a restart
        self.client_names = tuple(names)
        decision = self.session.connect(info.client_ip, names, listener)
        info.profile = self.match.profile.name
        info.postmaster = self.policy.postmaster
        verdict = decision.verdict
        if verdict.reply is not None:
            self.state.refusals.refused(
                info.client_ip,
                verdict.reply,
                f"{verdict.reason} ({self.match.reason()})",
                listener=info.listener,
                profile=self.match.profile.name,
            )  # publishes the refusal (events.Refused, stage CONNECT)
            return verdict.reply
        events.publish(events.Connected(self.client(info)))
        log.info(
            "connect",
            listener=info.listener,
            client=info.client_ip,
            profile=self.match.profile.name,
            why=self.match.reason(),
        )
        info.offer_starttls = info.offer_starttls and decision.starttls_offered
        info.auth_mechanisms = MECHANISMS if decision.auth_offered else ()
        return None

    # -- commands ------------------------------------------------------------

    def on_command(self, info: SessionInfo, event: ev.Event) -> Reply | Pending | None:
        if isinstance(event, ev.MailFrom):
            return self._mail(info, event.sender)
        if isinstance(event, ev.RcptTo):
            return self._rcpt(info, event.recipient)
        return None

    def _mail(self, info: SessionInfo, sender: str) -> Reply | None:
        decision = self.session.mail(
            sender,
            tls_active=info.tls is not None,
            client_certificate=info.client_certificate is not None,
        )
        refusal = decision.refusal
        if refusal is not None:
            log.info("sender refused", client=info.client_ip, sender=sender, why=refusal.reason)
            if refusal.reply is not None:
                self.refused("MAIL", info, refusal.reply, refusal.reason, sender=sender)
            return refusal.reply
        info.spam_check = decision.spam_check[0]
        return None

    def _rcpt(self, info: SessionInfo, recipient: str) -> Reply | Pending | None:
        decision = self.session.rcpt(info.sender or "", recipient)
        verdict = decision.verdict
        if verdict.reply is not None:  # a refused relay, or no route: never accepted and lost
            log.info("recipient refused", client=info.client_ip, rcpt=recipient, why=verdict.reason)
            self.refused("RCPT", info, verdict.reply, verdict.reason, recipient=recipient)
            return verdict.reply
        # Only what the relay decision accepted is validated (content.recipients).
        found = self.state.recipients.check(
            self.policy, self.state.resolver, decision.recipient, decision.connector
        )
        if found is None or isinstance(found, Reply):
            return self._validated(info, recipient, found)
        return Pending(self._after_callout(info, recipient, found))

    async def _after_callout(
        self, info: SessionInfo, recipient: str, callout: Awaitable[Reply | None]
    ) -> Reply | None:
        return self._validated(info, recipient, await callout)

    def _validated(self, info: SessionInfo, recipient: str, reply: Reply | None) -> Reply | None:
        if reply is not None:
            log.info("recipient refused", client=info.client_ip, rcpt=recipient, reply=reply.text())
            self.refused("RCPT", info, reply, "unknown recipient", recipient=recipient)
        return reply

    # -- AUTH ----------------------------------------------------------------

    async def on_auth(self, info: SessionInfo, username: str, password: str) -> Reply:
        throttle, ip = self.state.throttle, info.client_ip
        if throttle.locked(ip, self.state.now()):
            log.info("auth refused", client=ip, user=username, why="locked out")
            self.refused("AUTH", info, LOCKED_OUT, "locked out after failed logins")
            return LOCKED_OUT
        owner = self.policy.credentials.verify(username, password)
        decision = self.session.authenticate(owner)
        profile = decision.profile
        if profile is None:
            delay = throttle.record_failure(ip, self.state.now())
            log.info("auth failed", client=ip, user=username, delay=delay, why=decision.reason)
            self.refused("AUTH", info, BAD_CREDENTIALS, f"authentication failed: {decision.reason}")
            await asyncio.sleep(delay)
            return LOCKED_OUT if throttle.locked(ip, self.state.now()) else BAD_CREDENTIALS
        throttle.record_success(ip)
        info.profile = profile.name
        log.info("auth ok", client=ip, user=username, profile=profile.name)
        return AUTHENTICATED

    # -- the message ---------------------------------------------------------

    async def on_message(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        outcome = await self._check_content(info, envelope, body)
        if outcome.reply is not None and outcome.action in ("reject", "tempfail"):
            log.info(
                "message refused",
                queue_id=body.queue_id,
                client=info.client_ip,
                sender=envelope.sender,
                reply=outcome.reply.text(),
                why=outcome.summary(),
            )
            self.refused(
                "END-OF-MESSAGE", info, outcome.reply, outcome.summary(), queue_id=body.queue_id
            )
            return outcome.reply
        if outcome.action == "quarantine":
            return await self._quarantine(info, envelope, body, outcome)
        config, internal = self.policy.config, self.session.internal()
        write_verdicts(body, outcome, forged_results(config, internal))
        await sign_outbound(body, envelope.sender, config, self.policy.certificates, internal)
        return await self._queue(info, envelope, body)

    async def _check_content(
        self, info: SessionInfo, envelope: Envelope, body: SpooledBody
    ) -> Outcome:
        if not self.state.scanners:
            return ACCEPTED
        facts = MessageFacts(
            body.queue_id,
            envelope,
            self.policy.config.gateway.hostname,
            client_name=self.client_names[0] if self.client_names else None,
            internal=self.session.internal(),
        )
        outcome = await scan(facts, body, self.policy.config, self.state.scanners)
        results = tuple((r.scanner, r.action) for r in outcome.results)
        events.publish(events.ContentVerdict(body.queue_id, outcome.action, results))
        return outcome

    async def _quarantine(
        self, info: SessionInfo, envelope: Envelope, body: SpooledBody, outcome: Outcome
    ) -> Reply:
        """Held by a verdict: kept aside (durably) instead of queued; the client
        hears 250, as for any accepted message."""
        quarantine = self.state.quarantine
        if quarantine is None:  # no quarantine here: refuse rather than lose or pass it
            return QUARANTINE_UNAVAILABLE
        try:
            await quarantine.hold(envelope, body, outcome)
        except OSError as exc:
            log.error("quarantine write failed", error=str(exc))
            return QUEUE_FAILED
        log.info(
            "quarantined",
            queue_id=body.queue_id,
            client=info.client_ip,
            sender=envelope.sender,
            why=outcome.summary(),
        )
        rcpts = tuple(r.address for r in envelope.recipients)
        held = events.Quarantined(
            body.queue_id, self.client(info), envelope.sender, rcpts, outcome.summary()
        )
        events.publish(held)
        return Reply.of(250, "2.0.0", f"Ok: queued as {body.queue_id}")

    async def _queue(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        message_id = events.message_id(body.head(HEAD_FOR_MESSAGE_ID))  # before ingest moves it
        try:
            queue_id = await self.queue.ingest(envelope, body)
        except (OSError, QueueError) as exc:
            log.error("queue write failed", error=str(exc))
            return QUEUE_FAILED  # never a 250 for a message that is not durable
        log.info(
            "queued",
            queue_id=queue_id,
            sender=envelope.sender,
            rcpts=len(envelope.recipients),
            size=body.size,
            profile=envelope.profile,
            spam_check=envelope.spam_check,
            client=info.client_ip,
            tls=info.tls,
        )
        rcpts = tuple(r.address for r in envelope.recipients)
        events.publish(
            events.MessageAccepted(
                queue_id,
                self.client(info),
                envelope.sender,
                rcpts,
                body.size,
                message_id,
                self._verdicts(envelope),
            )
        )
        return Reply.of(250, "2.0.0", f"Ok: queued as {queue_id}")

    def _verdicts(self, envelope: Envelope) -> tuple[tuple[str, str], ...]:
        """The session's decisions for tracking: profile and why, relay, spam check."""
        found = [("profile", f"{self.match.profile.name} ({self.match.reason()})")]
        found.append(("spam_check", "yes" if envelope.spam_check else "no"))
        if envelope.auth_user:
            found.append(("auth", envelope.auth_user))
        return tuple(found)
