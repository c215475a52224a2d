"""``smtpgate connector verify``: the manual's *Verify* button, step by step.

Connects as the connector would (the smarthost, or the first reachable MX
of ``--domain``), reads the greeting, says EHLO, does STARTTLS as its
security demands, authenticates when it has credentials, and says QUIT;
every step is reported, and the first failure ends the run. No mail is sent.
For direct delivery, the ``outbound TLS`` step says what the policy table
(``policy.transport``: connector, profile, DANE, MTA-STS) requires of each MX
host and why, from the domain's records looked up now.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpgate.config.schema import GatewayConfig, SendConnector
from smtpgate.delivery.client import SmtpClient
from smtpgate.delivery.published import lookup_published
from smtpgate.delivery.targets import NoTarget, Target, resolve_targets
from smtpgate.dns import DnsResolver
from smtpgate.errors import DeliveryError
from smtpgate.policy.transport import describe, secure_policy
from smtpgate.snapshot import Snapshot
from smtpgate.tls.context import client_context


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str


async def _targets(
    config: GatewayConfig, connector: SendConnector, domain: str | None
) -> tuple[list[Target], Step]:
    deliver = connector.deliver
    if deliver.smarthost is None and not domain:
        return [], Step("target", False, "direct delivery: name a recipient domain with --domain")
    found = await resolve_targets(DnsResolver(config.gateway.dns), deliver, domain or "")
    if isinstance(found, NoTarget):
        return [], Step("target", False, found.text)
    where = "smarthost" if deliver.smarthost is not None else "MX hosts"
    shown = ", ".join(f"{t.host} ({t.address}):{t.port}" for t in found)
    return found, Step("target", True, f"{where} {shown}")


async def _outbound_tls(
    config: GatewayConfig, connector: SendConnector, domain: str, targets: list[Target]
) -> Step:
    """The policy table's answer for each MX host of ``domain``."""
    facts = (await lookup_published(config, [domain])).get(domain)
    snapshot = Snapshot.compile(config, certificates=False)
    lines, usable = [], False
    for host in dict.fromkeys(t.host for t in targets):
        base = snapshot.outbound_tls(connector, host, domain)
        policy = secure_policy(base, config.outbound_security, facts, host)
        usable = usable or policy.refusal is None
        lines.append(f"{host}: {describe(policy)} ({'; '.join(policy.reasons)})")
    return Step("outbound TLS", usable, "; ".join(lines))


async def verify_connector(
    config: GatewayConfig, connector: SendConnector, password: str | None, domain: str | None
) -> list[Step]:
    targets, first = await _targets(config, connector, domain)
    steps = [first]
    if not first.ok:
        return steps
    if connector.deliver.dns is not None and domain:
        steps.append(await _outbound_tls(config, connector, domain, targets))
    for target in targets:
        host, port = target.host, target.port
        try:
            client = await SmtpClient.connect(
                target.address,
                port,
                timeout=config.timeouts.delivery_connect,
                command_timeout=min(config.timeouts.delivery_command, 30),
                tls=client_context() if connector.security == "implicit-tls" else None,
                server_hostname=host,
            )
        except DeliveryError as exc:
            steps.append(Step("connect", False, str(exc)))
            continue
        steps.append(
            Step("connect", True, f"{host}:{port}" + (f" ({client.tls})" if client.tls else ""))
        )
        try:
            await _converse(client, config, connector, host, password, steps)
        except DeliveryError as exc:
            steps.append(Step("connection", False, str(exc)))
        finally:
            await client.close()
        return steps
    return steps


async def _converse(  # noqa: PLR0913, PLR0917 - the steps need all of it
    client: SmtpClient,
    config: GatewayConfig,
    connector: SendConnector,
    host: str,
    password: str | None,
    steps: list[Step],
) -> None:
    greeting = await client.greeting()
    steps.append(Step("greeting", greeting.code == 220, greeting.text()))
    if greeting.code != 220:
        return
    reply = await client.hello(config.gateway.hostname)
    steps.append(
        Step("EHLO", reply.code == 250, " ".join(sorted(client.extensions)) or reply.text())
    )
    if reply.code != 250:
        return
    security = connector.security
    if security in ("starttls", "require-starttls"):
        if "STARTTLS" not in client.extensions:
            steps.append(
                Step(
                    "STARTTLS",
                    security == "starttls",
                    "not offered"
                    + (" (required by this connector)" if security == "require-starttls" else ""),
                )
            )
            if security == "require-starttls":
                return
        else:
            await client.starttls(client_context(), server_hostname=host)
            await client.hello(config.gateway.hostname)
            steps.append(Step("STARTTLS", True, client.tls or "?"))
    smarthost = connector.deliver.smarthost
    if smarthost is not None and smarthost.username is not None:
        if client.tls is None and security != "none":
            steps.append(Step("AUTH", False, "refusing to send the password without TLS"))
            return
        reply = await client.auth_plain(smarthost.username, password or "")
        steps.append(Step("AUTH", reply.code == 235, f"as {smarthost.username}: {reply.text()}"))
