"""What a session and its handler agree on: the facts of a session, the
handler's four hooks, and a listener's settings. The gateway and the sink
implement :class:`SessionHandler`; ``smtpgate.inbound.session`` drives it."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from smtpgate.model.envelope import Envelope, MailParams, Recipient
from smtpgate.proto import events as ev
from smtpgate.proto.replies import Reply
from smtpgate.proto.state import SessionLimits
from smtpgate.spool import SpooledBody

_NO_PARAMS = MailParams()


@dataclass
class SessionInfo:
    """Facts about one session that handlers read (and policy later extends)."""

    listener: str
    client_ip: str
    client_port: int
    hostname: str
    tls: str | None = None
    helo: str = ""
    esmtp: bool = False
    auth_user: str | None = None
    sender: str | None = None
    mail_params: MailParams = _NO_PARAMS
    recipients: list[Recipient] = field(default_factory=list)
    # What the session offers; the handler may change these in on_connect.
    offer_starttls: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    postmaster: str = ""  # RCPT TO:<Postmaster> goes here; "": postmaster@hostname
    client_certificate: str | None = None  # "subject (sha256 ...)" once verified
    # What the listener demands before MAIL (from its settings); the handler decides.
    tls_required: bool = False  # security: require-starttls
    client_certificate_required: bool = False  # a client_identity
    # What the handler decided, carried into the envelope.
    spam_check: bool = True
    profile: str = ""

    def envelope(self) -> Envelope:
        return Envelope(
            sender=self.sender or "",
            recipients=tuple(self.recipients),
            mail_params=self.mail_params,
            helo=self.helo,
            client_ip=self.client_ip,
            client_port=self.client_port,
            tls=self.tls,
            auth_user=self.auth_user,
            spam_check=self.spam_check,
            profile=self.profile,
        )


@dataclass(frozen=True)
class Pending:
    """A command's answer that needs I/O first (a recipient callout, a directory
    lookup): the session stops reading, awaits ``answer`` and replies with what
    it gives (``None``: the default reply), keeping pipelined replies in order.
    ``answer`` must be bounded in time; it should never raise."""

    answer: Awaitable[Reply | None]


class SessionHandler(Protocol):
    """What the session asks; the gateway and the sink each provide one."""

    def on_connect(self, info: SessionInfo) -> Reply | Pending | None:
        """Before the greeting: ``None`` for 220, or a 554/421 refusal;
        ``Pending`` when the decision needs I/O first (host-name lookups)."""

    def on_command(self, info: SessionInfo, event: ev.Event) -> Reply | Pending | None:
        """Per command, a pure decision: ``None`` for the default answer; ``Pending``
        when the answer needs I/O."""

    async def on_message(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        """A complete, checked body: hand it on and return the final reply."""

    async def on_auth(self, info: SessionInfo, username: str, password: str) -> Reply:
        """Verify credentials: 235 to accept, 535 or 454 to refuse."""


@dataclass(frozen=True)
class SessionSettings:
    limits: SessionLimits
    command_timeout: float
    data_timeout: float
    tls_handshake_timeout: float
    spool_dir: Path
    tls_context: ssl.SSLContext | None  # None: STARTTLS not offered
    require_tls: bool  # a fact for the handler (SessionInfo.tls_required), which decides
    proxy_protocol: bool = False
    proxy_timeout: float = 10.0
    plaintext_auth_on_loopback: bool = False
    banner: str = "ESMTP smtpgate"  # the greeting is "220 <hostname> <banner>"
    client_certificate_required: bool = False
    client_certificate_pin: str | None = None  # SHA-256 the client certificate must have
    client_spki_pin: str | None = None  # base64 SHA-256 of the public key it must carry
