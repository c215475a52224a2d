"""Hand one received message to a smarthost before answering the client.

This is the interim delivery path until the durable queue lands: the client
hears 250 only after the next hop has said 250, so nothing acknowledged is
ever held only in our memory. A message is relayed all or nothing: if the
next hop refuses any recipient, nothing is sent (RSET) and the client gets
that refusal for the whole message, so it is neither lost nor duplicated.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from smtpgate.config.schema import SendConnector, Timeouts
from smtpgate.delivery.client import SmtpClient
from smtpgate.errors import DeliveryError
from smtpgate.model.envelope import Envelope, MailParams, Recipient
from smtpgate.proto.replies import Reply
from smtpgate.spool import SpooledBody


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the client is told, and what the log records about the hop."""

    reply: Reply
    detail: str
    tls: str | None = None


def _encode_xtext(text: str) -> str:
    """RFC 3461 §4: escape '+', '=' and anything outside printable ASCII."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode())
        for ch in text
    )


def mail_command(sender: str, params: MailParams, size: int, offered: dict[str, str]) -> str:
    words = [f"MAIL FROM:<{sender}>"]
    if "SIZE" in offered:
        words.append(f"SIZE={size}")
    if params.body == "8BITMIME" and "8BITMIME" in offered:
        words.append("BODY=8BITMIME")
    if params.smtputf8 and "SMTPUTF8" in offered:
        words.append("SMTPUTF8")
    if "DSN" in offered:
        if params.ret:
            words.append(f"RET={params.ret}")
        if params.envid:
            words.append(f"ENVID={_encode_xtext(params.envid)}")
    return " ".join(words)


def rcpt_command(recipient: Recipient, offered: dict[str, str]) -> str:
    words = [f"RCPT TO:<{recipient.address}>"]
    params = recipient.params
    if "DSN" in offered:
        if params.notify is not None:
            order = ("SUCCESS", "FAILURE", "DELAY")
            words.append("NOTIFY=" + (",".join(n for n in order if n in params.notify) or "NEVER"))
        if params.orcpt:
            words.append(f"ORCPT={params.orcpt[0]};{_encode_xtext(params.orcpt[1])}")
    return " ".join(words)


def _client_context() -> ssl.SSLContext:
    """Opportunistic TLS: encrypt, do not verify (validation comes with policy/tls)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _relayed(reply: Reply, what: str) -> Reply:
    """Our answer to the client for a next-hop refusal, keeping its class."""
    status = reply.status or ("4.4.0" if reply.is_transient else "5.0.0")
    code = reply.code if reply.code >= 400 else 451
    return Reply.of(code, status, f"Next hop refused {what}: {' '.join(reply.lines)}"[:400])


@dataclass(frozen=True, slots=True)
class HandOff:
    """One message to relay and everything the attempt needs to know."""

    connector: SendConnector
    envelope: Envelope
    body: SpooledBody
    helo: str
    timeouts: Timeouts
    queue_id: str

    @property
    def where(self) -> str:
        target = self.connector.deliver.smarthost
        assert target is not None
        return f"{self.connector.name} ({target.host}:{target.port})"


async def relay_message(job: HandOff) -> Outcome:
    """Relay through the connector's smarthost; never raises for the peer's faults."""
    target = job.connector.deliver.smarthost
    assert target is not None
    implicit = job.connector.security == "implicit-tls"
    try:
        client = await SmtpClient.connect(
            target.host,
            target.port,
            timeout=job.timeouts.delivery_connect,
            command_timeout=job.timeouts.delivery_command,
            tls=_client_context() if implicit else None,
        )
    except DeliveryError as exc:
        return Outcome(Reply.of(451, "4.4.1", "Next hop unreachable, try again later"), str(exc))
    try:
        return await _converse(client, job)
    except DeliveryError as exc:
        failed = Reply.of(451, "4.4.2", "Next hop failed during delivery, try again later")
        return Outcome(failed, f"{job.where}: {exc}", client.tls)
    finally:
        await client.close()


async def _converse(client: SmtpClient, job: HandOff) -> Outcome:
    where = job.where
    greeting = await client.read_reply()
    if greeting.code != 220:
        return Outcome(_relayed(greeting, "the connection"), f"{where}: {greeting.text()}")
    reply = await client.hello(job.helo)
    if reply.code != 250:
        return Outcome(_relayed(reply, "EHLO"), f"{where}: {reply.text()}")
    refusal = await _secure(client, job)
    if refusal is not None:
        return refusal
    envelope = job.envelope
    size = job.body.size
    mail = mail_command(envelope.sender, envelope.mail_params, size, client.extensions)
    reply = await client.command(mail)
    if reply.code != 250:
        return Outcome(_relayed(reply, "the sender"), f"{where}: MAIL {reply.text()}", client.tls)
    for recipient in envelope.recipients:
        reply = await client.command(rcpt_command(recipient, client.extensions))
        if reply.code not in (250, 251):
            await client.command("RSET")
            detail = f"{where}: RCPT <{recipient.address}> {reply.text()}"
            return Outcome(_relayed(reply, f"<{recipient.address}>"), detail, client.tls)
    reply = await client.send_body(job.body, job.timeouts.delivery_data_end)
    if reply.code != 250:
        return Outcome(_relayed(reply, "the message"), f"{where}: {reply.text()}", client.tls)
    accepted = Reply.of(250, "2.0.0", f"Ok: queued as {job.queue_id}")
    return Outcome(accepted, f"{where}: {reply.text()}", client.tls)


async def _secure(client: SmtpClient, job: HandOff) -> Outcome | None:
    """STARTTLS as the connector's security demands; a refusal when it cannot be met."""
    security = job.connector.security
    if security not in ("starttls", "require-starttls"):
        return None
    if "STARTTLS" not in client.extensions:
        if security == "require-starttls":
            why = f"{job.where}: STARTTLS required but not offered"
            return Outcome(Reply.of(451, "4.7.5", "Next hop does not offer required TLS"), why)
        return None
    target = job.connector.deliver.smarthost
    assert target is not None
    try:
        await client.starttls(_client_context(), server_hostname=target.host)
    except DeliveryError as exc:
        if security == "require-starttls":
            failed = Reply.of(451, "4.7.5", "TLS with next hop failed")
            return Outcome(failed, f"{job.where}: {exc}")
        raise
    reply = await client.hello(job.helo)
    if reply.code != 250:
        return Outcome(_relayed(reply, "EHLO"), f"{job.where}: {reply.text()}", client.tls)
    return None
