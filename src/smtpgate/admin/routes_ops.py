"""The operation routes: status, the queue, policy explain, connector verify and status,
credentials and secret encryption."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, Field

from smtpgate.admin import nodes
from smtpgate.admin.http import Actor, StrictBody
from smtpgate.admin.keys import encryption_key
from smtpgate.admin.operations import (
    explain_policy,
    message_dict,
    queue_act,
    queue_list,
    queue_show,
    send_credentials,
)
from smtpgate.admin.services import ConfigService, node_status, record
from smtpgate.config.load import parse_config
from smtpgate.config.secret import encrypt
from smtpgate.delivery.health import read_status, status_table
from smtpgate.delivery.pop3 import verify_pop3
from smtpgate.delivery.published import lookup_published
from smtpgate.delivery.verify import verify_connector
from smtpgate.dns import DnsResolver, confirmed_names
from smtpgate.errors import NotFound
from smtpgate.policy.explain import Facts, UnknownListenerError
from smtpgate.queue.states import PendingState
from smtpgate.queue.store import QueueStore
from smtpgate.snapshot import Snapshot


def _ip_address(value: str) -> str:
    return str(ipaddress.ip_address(value))  # ValueError: "does not appear to be an IP"


class ExplainRequest(StrictBody):
    client_ip: Annotated[str, AfterValidator(_ip_address)] = Field(max_length=100)
    confirmed_names: list[str] = Field(default_factory=list, max_length=20)
    helo: str | None = Field(default=None, max_length=255)
    sender: str | None = Field(default=None, max_length=512)
    recipients: list[str] = Field(default_factory=list, max_length=100)
    tls: bool = False
    auth_user: str | None = Field(default=None, max_length=255)
    client_certificate: str | None = Field(default=None, max_length=1000)
    listener: str | None = Field(default=None, max_length=255)  # a configured listener's name
    lookup: bool = False  # add the forward-confirmed names the gateway's DNS finds


class Secret(StrictBody):
    value: str = Field(min_length=1, max_length=4096)


def operation_routes(router: APIRouter, service: ConfigService) -> None:
    queue_dir = service.data_dir / "queue"

    def applied_config() -> Any:
        return parse_config(service.applied().document)

    def with_queue(work: Callable[[QueueStore], Any]) -> Any:
        store = QueueStore(queue_dir)
        try:
            return work(store)
        finally:
            store.close()

    @router.get("/status", tags=["operations"])
    def status() -> dict[str, Any]:
        return node_status(service.store, service.data_dir, service.node)

    @router.get("/cluster", tags=["operations"])
    def cluster() -> dict[str, Any]:
        return nodes.cluster(service.store, time.time())

    @router.delete("/cluster/{node}", tags=["operations"])
    def forget(node: str, who: Actor, force: bool = False) -> dict[str, Any]:
        nodes.forget(service.store, node, time.time(), force=force)
        record(service.store, who, "cluster forget", node)
        return {"node": node, "result": "forgotten"}

    @router.get("/queue", tags=["queue"])
    def listing(
        state: PendingState | None = None,
        sender: str | None = None,
        recipient: str | None = None,
        domain: str | None = None,
        older_than: str | None = None,
    ) -> list[dict[str, Any]]:
        filters = {
            "state": state,
            "sender": sender,
            "recipient": recipient,
            "domain": domain,
            "older_than": older_than,
        }
        found: list[dict[str, Any]] = with_queue(lambda s: queue_list(s, filters))
        return found

    @router.get("/queue/{message_id}", tags=["queue"])
    def show(message_id: str) -> dict[str, Any]:
        return message_dict(with_queue(lambda s: queue_show(s, message_id)))

    @router.post("/queue/{message_id}/{action}", tags=["queue"])
    def act(
        message_id: str, action: Literal["retry", "hold", "release", "bounce"], who: Actor
    ) -> dict[str, Any]:
        result: dict[str, Any] = with_queue(lambda s: queue_act(s, action, message_id))
        record(service.store, who, f"queue.{action}", message_id)
        return result

    @router.delete("/queue/{message_id}", tags=["queue"])
    def delete(message_id: str, who: Actor) -> dict[str, Any]:
        result: dict[str, Any] = with_queue(lambda s: queue_act(s, "delete", message_id))
        record(service.store, who, "queue.delete", message_id)
        return result

    @router.post("/queue-retry-all", tags=["queue"])
    def retry_all(who: Actor) -> dict[str, Any]:
        result: dict[str, Any] = with_queue(lambda s: queue_act(s, "retry", None))
        record(service.store, who, "queue.retry", "all")
        return result

    @router.post("/policy/explain", tags=["operations"])
    async def explain(request: ExplainRequest) -> dict[str, Any]:
        config = applied_config()
        asked = request.model_dump(exclude={"lookup"})
        if request.lookup:  # from the gateway, with gateway.dns: what a session would see
            resolver = DnsResolver(config.gateway.dns)
            asked["confirmed_names"] += await confirmed_names(resolver, request.client_ip)
            domains = [r.rpartition("@")[2] for r in request.recipients]
            asked["published"] = await lookup_published(config, domains)
        try:
            result: dict[str, Any] = explain_policy(config, Facts(**asked)).as_dict()
        except UnknownListenerError as exc:  # 422, naming the field, as for the others
            error = {"loc": ("body", "listener"), "msg": str(exc), "type": "value_error"}
            raise RequestValidationError([{**error, "input": request.listener}]) from None
        return result

    connector_routes(router, service)

    @router.post("/profiles/{name}/send-credentials", tags=["operations"])
    def credentials(name: str, who: Actor) -> dict[str, str]:
        config = applied_config()
        result: dict[str, str] = with_queue(lambda s: send_credentials(config, s, name))
        record(service.store, who, "credentials.send", f"{name} → {result['to']}")
        return result

    @router.post("/secrets/encrypt", tags=["operations"])
    def encrypt_secret(body: Secret) -> dict[str, str]:
        return {"value": encrypt(encryption_key(service.store, service.data_dir), body.value)}


def connector_routes(router: APIRouter, service: ConfigService) -> None:
    """``connector verify`` (send and POP3 connectors) and ``connector status``."""

    def applied_config() -> Any:
        return parse_config(service.applied().document)

    @router.post("/connectors/{name}/verify", tags=["operations"])
    async def verify(name: str, domain: str | None = None) -> list[dict[str, Any]]:
        config = applied_config()
        connector = next((c for c in config.send_connectors if c.name == name), None)
        fetching = next((c for c in config.receive_connectors.pop3 if c.name == name), None)
        if connector is None and fetching is not None:
            found = await asyncio.to_thread(verify_pop3, config, fetching)
            return [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in found]
        if connector is None:
            raise NotFound(f"no send or POP3 connector named {name!r}")
        password = Snapshot.compile(config, certificates=False).smarthost_password(connector)
        steps = await verify_connector(config, connector, password, domain)
        return [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in steps]

    @router.get("/connectors/status", tags=["operations"])
    def connector_status() -> list[dict[str, Any]]:
        """Each send connector's health per destination, as the gateway last wrote it."""
        names = [c.name for c in parse_config(service.applied().document).send_connectors]
        return status_table(read_status(service.data_dir), names)
