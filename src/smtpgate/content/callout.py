"""An SMTP callout: ask the internal mail server whether it knows a recipient.

The probe goes where mail for the recipient would go: the send connector
routing chose, its smarthost (or the domain's MX hosts), with the
connector's security (``implicit-tls``; ``starttls`` when offered, in the
clear again if the handshake fails, as delivery does; ``require-starttls``
never without TLS), its outbound TLS policy and its smarthost credentials.
The conversation is EHLO, MAIL FROM:<>, RCPT TO:<address>, then RSET and
QUIT: never DATA, so nothing is ever delivered by a probe.

A 2xx to RCPT means the recipient exists, a 5xx that it does not; anything
else (4xx, a refused MAIL FROM:<>, no server reachable, a timeout, a broken
reply) is *unknown*, which the gateway answers with a 451, never a 250.
The whole probe is bounded by the caller's deadline; this module never
raises for a network or protocol problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import Literal, Protocol

from smtpgate.config.schema import SendConnector
from smtpgate.delivery.client import SmtpClient
from smtpgate.delivery.targets import NoTarget, Target, resolve_targets
from smtpgate.dns import Resolver
from smtpgate.errors import DeliveryError, ProtocolUsageError
from smtpgate.policy.relay import split_address
from smtpgate.policy.tls import OutboundPolicy
from smtpgate.proto.replies import Reply
from smtpgate.snapshot import Snapshot
from smtpgate.tls.certificates import certificate_matches
from smtpgate.tls.context import client_context

Result = Literal["valid", "invalid", "unknown"]


@dataclass(frozen=True)
class CalloutResult:
    result: Result
    detail: str  # the server's reply, or why there was none (for the logs)
    reached: bool = True  # some server answered the probe (false: the destination is down)


class _Unavailable(Exception):  # noqa: N818 - a result, not an error
    """This target cannot answer the probe; try the next."""


@dataclass(frozen=True)
class Probe:
    snapshot: Snapshot
    resolver: Resolver
    connector: SendConnector
    hostname: str  # our EHLO name

    async def run(self, address: str) -> CalloutResult:
        """The probe's result for ``address``; the caller bounds it in time."""
        domain = split_address(address)[1]
        found = await resolve_targets(self.resolver, self.connector.deliver, domain)
        if isinstance(found, NoTarget):
            return CalloutResult("unknown", found.text, reached=False)
        last = "no address to connect to"
        for target in found:
            try:
                return await self._target(target, domain, address)
            except _Unavailable as exc:
                last = str(exc)
        return CalloutResult("unknown", f"unreachable: {last}", reached=False)

    async def _target(self, target: Target, domain: str, address: str) -> CalloutResult:
        policy = self.snapshot.outbound_tls(self.connector, target.host, domain)
        try:
            return await self._session(target, policy, address, plaintext=False)
        except _TlsFailedError as exc:  # opportunistic STARTTLS failed: in the clear, as delivery
            if policy.mandatory or self.connector.security != "starttls":
                raise _Unavailable(str(exc)) from exc
            return await self._session(target, policy, address, plaintext=True)

    async def _session(
        self, target: Target, policy: OutboundPolicy, address: str, *, plaintext: bool
    ) -> CalloutResult:
        timeouts = self.snapshot.config.timeouts
        implicit = self.connector.security == "implicit-tls"
        try:
            client = await SmtpClient.connect(
                target.address,
                target.port,
                timeout=timeouts.delivery_connect,
                command_timeout=timeouts.delivery_command,
                tls=self._ssl(policy) if implicit else None,
                server_hostname=target.host,
            )
        except DeliveryError as exc:
            raise _Unavailable(str(exc)) from exc
        try:
            return await self._converse(client, target, policy, address, plaintext=plaintext)
        except (DeliveryError, ProtocolUsageError) as exc:
            return CalloutResult("unknown", f"{target.host}: {exc}")
        finally:
            await client.close()

    def _ssl(self, policy: OutboundPolicy) -> ssl.SSLContext:
        return client_context(
            policy.minimum,
            policy.strength,
            validate=policy.validate,
            ca_files=[str(p) for p in self.snapshot.config.tls.ca_files],
            identity=self.snapshot.client_certificate(self.connector),
        )

    async def _converse(
        self,
        client: SmtpClient,
        target: Target,
        policy: OutboundPolicy,
        address: str,
        *,
        plaintext: bool,
    ) -> CalloutResult:
        host = target.host
        greeting = await client.greeting()
        if greeting.code != 220:
            raise _Unavailable(f"{host} greeted with {greeting.text()}")
        reply = await client.hello(self.hostname)
        if reply.code != 250:
            return CalloutResult("unknown", f"{host} refused EHLO: {reply.text()}")
        await self._secure(client, host, policy, plaintext=plaintext)
        await self._authenticate(client, host)
        utf8 = not address.isascii()  # RFC 6531 §3.4: only with SMTPUTF8
        if utf8 and "SMTPUTF8" not in client.extensions:
            return CalloutResult("unknown", f"{host} does not offer SMTPUTF8 for {address}")
        client.core.command("MAIL", "MAIL FROM:<> SMTPUTF8" if utf8 else "MAIL FROM:<>")
        reply = (await client.answer()).reply
        if reply.code != 250:  # RFC 5321 §4.5.5: the null sender must be accepted
            return CalloutResult("unknown", f"{host} refused MAIL FROM:<>: {reply.text()}")
        client.core.command("RCPT", f"RCPT TO:<{address}>")
        reply = (await client.answer()).reply
        with contextlib.suppress(DeliveryError, ProtocolUsageError):
            client.core.command("RSET", "RSET")
            await client.answer()
        return CalloutResult(_result(reply), f"{host}: {reply.text()}")

    async def _secure(
        self, client: SmtpClient, host: str, policy: OutboundPolicy, *, plaintext: bool
    ) -> None:
        security = self.connector.security
        offered = "STARTTLS" in client.extensions
        if client.tls is None and not plaintext and security != "none" and offered:
            try:
                await client.starttls(self._ssl(policy), server_hostname=host)
            except DeliveryError as exc:
                raise _TlsFailedError(str(exc)) from exc
            await client.hello(self.hostname)
        if client.tls is None and (policy.mandatory or security == "require-starttls"):
            raise _Unavailable(f"{host} offers no TLS, and TLS is mandatory")
        if client.tls is not None and policy.validate and not _names_ok(client, policy):
            raise _Unavailable(f"the certificate of {host} does not match")

    async def _authenticate(self, client: SmtpClient, host: str) -> None:
        smarthost = self.connector.deliver.smarthost
        if smarthost is None or smarthost.username is None:
            return
        if client.tls is None and self.connector.security != "none":
            raise _Unavailable("refusing to send the smarthost password without TLS")
        password = self.snapshot.smarthost_password(self.connector) or ""
        reply = await client.auth_plain(smarthost.username, password)
        if reply.code != 235:
            raise _Unavailable(f"AUTH with {host} failed: {reply.text()}")


class _TlsFailedError(Exception):
    """The STARTTLS handshake failed."""


def _result(reply: Reply) -> Result:
    if 200 <= reply.code < 300:
        return "valid"
    if 500 <= reply.code < 600:
        return "invalid"
    return "unknown"


def _names_ok(client: SmtpClient, policy: OutboundPolicy) -> bool:
    ssl_object = client.writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der is not None and certificate_matches(der, policy.names)


class Asker(Protocol):
    """A probe or a directory lookup: whether ``address`` exists."""

    async def run(self, address: str) -> CalloutResult: ...


async def bounded(probe: Asker, address: str, timeout: float) -> CalloutResult:
    """``probe.run`` within ``timeout`` seconds; a timeout is *unknown*."""
    try:
        async with asyncio.timeout(timeout):
            return await probe.run(address)
    except TimeoutError:
        return CalloutResult("unknown", f"no answer within {timeout:g} s", reached=False)
