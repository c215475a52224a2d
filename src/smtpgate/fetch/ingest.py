"""A fetched message through the gateway's own ingest, as if it arrived by SMTP.

:class:`FetchHandler` is the gateway's session handler
(:class:`~smtpgate.gateway.GatewayHandler`) driven with the facts of a fetch:
the connection profile is the one chosen for the connector (``profile``, or
the default profile), not one matched by IP; then MAIL (spoofing, inbound TLS
required, the spam-check decision), RCPT for each ``deliver_to`` address
(relay, the send connector, recipient validation) and the message hand-off
(content scanners, quarantine, verdict headers, DKIM signing, the queue)
run unchanged. What the client would have heard is the result: 250 (queued or
quarantined), 4xx (try again at the next poll) or 5xx (refused).
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

from smtpgate.gateway import GatewayHandler
from smtpgate.inbound.contract import Pending, SessionInfo
from smtpgate.model.envelope import Recipient
from smtpgate.policy.profile import ProfileMatch
from smtpgate.policy.relay import decide_connect
from smtpgate.proto import events as ev
from smtpgate.proto.replies import Reply
from smtpgate.spool import SpooledBody

RETURN_PATH = re.compile(rb"^Return-Path:[ \t]*<([^<>\s]{0,254})>[ \t]*\r?$", re.IGNORECASE | re.M)
ADDRESS = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}$")
HEAD_LIMIT = 64 * 1024  # the Return-Path is looked for in this much of the head
UNKNOWN_PROFILE = Reply.of(451, "4.3.5", "The receive connector's profile does not exist")


def envelope_sender(message: bytes) -> str:
    """The sender a fetched message is queued with: its ``Return-Path`` (the
    envelope sender the provider recorded), else the null sender (so that a
    failed delivery never sends a report to a guessed address)."""
    head = message[:HEAD_LIMIT].split(b"\r\n\r\n", 1)[0]
    found = RETURN_PATH.search(head)
    if found is None:
        return ""
    sender = found.group(1).decode("ascii", "replace")
    return sender if ADDRESS.match(sender) else ""


def received(host: str, address: str, hostname: str, connector: str, tls: str | None) -> bytes:
    """Our trace header for a fetched message (RFC 5321 §4.4 fields; there is no
    registered WITH keyword for POP3, so the protocol is named in a comment)."""
    how = f"POP3 connector {connector}" + (f", {tls}" if tls else ", no TLS")
    return (
        f"Received: from {host} ([{address}])\r\n\tby {hostname} ({how});\r\n"
        f"\t{formatdate(time.time())}\r\n"
    ).encode("ascii", "replace")


class FetchHandler(GatewayHandler):
    """The gateway's handler for one fetched message."""

    async def take(
        self, info: SessionInfo, profile_name: str | None, connector: str, recipients: list[str]
    ) -> Reply | None:
        """The connect, MAIL and RCPT steps; None when the message may be handed on
        (``on_message``), else the refusal."""
        index = self.policy.profiles
        profile = index.default if profile_name is None else index.profiles.get(profile_name)
        if profile is None:
            return UNKNOWN_PROFILE
        self.session.match = ProfileMatch(profile, "connector", connector)
        info.profile = profile.name
        verdict = decide_connect(profile)
        if verdict.reply is not None:
            return verdict.reply
        sender = info.sender or ""
        refusal = self.on_command(info, ev.MailFrom(sender))
        if isinstance(refusal, Reply):
            return refusal
        first: Reply | None = None
        for address in recipients:
            answer = self.on_command(info, ev.RcptTo(address))
            if isinstance(answer, Pending):
                answer = await answer.answer
            if answer is not None and answer.code >= 400:
                first = first or answer
                continue
            info.recipients.append(Recipient(address))
        return first if not info.recipients else None

    async def deliver(self, info: SessionInfo, body: SpooledBody) -> Reply:
        return await self.on_message(info, info.envelope(), body)
