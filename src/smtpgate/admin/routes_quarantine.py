"""The quarantine routes: list, show, release and delete held messages.

They act on this node's ``data_dir/quarantine`` and queue directly, as the
queue routes do (the running gateway's queue manager picks a released
message up within a second); release and delete are audited.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from smtpgate.admin.http import Actor
from smtpgate.admin.services import ConfigService, record
from smtpgate.content import quarantine as q


def quarantine_routes(router: APIRouter, service: ConfigService) -> None:
    data_dir = service.data_dir

    def store() -> q.QuarantineStore:
        return q.QuarantineStore(q.quarantine_dir(data_dir))

    @router.get("/quarantine", tags=["quarantine"])
    def listing() -> list[dict[str, Any]]:
        return [q.entry_dict(held) for held in store().entries()]

    @router.get("/quarantine/{message_id}", tags=["quarantine"])
    def show(message_id: str) -> dict[str, Any]:
        return q.show_dict(store(), message_id)

    @router.post("/quarantine/{message_id}/release", tags=["quarantine"])
    def release(message_id: str, who: Actor) -> dict[str, Any]:
        result = q.release(data_dir, message_id)
        record(service.store, who, "quarantine.release", message_id)
        return result

    @router.delete("/quarantine/{message_id}", tags=["quarantine"])
    def delete(message_id: str, who: Actor) -> dict[str, Any]:
        result = q.delete(data_dir, message_id)
        record(service.store, who, "quarantine.delete", message_id)
        return result
