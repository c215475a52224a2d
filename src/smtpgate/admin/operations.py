"""Operations on a running gateway's data, shared by the REST API and the CLI.

Queue actions work on the queue database directly (a running gateway's
manager notices within a second), like Postfix's postqueue and postsuper.
``explain`` and ``send_credentials`` use the applied configuration; the
credentials message enters the queue through :meth:`QueueStore.ingest`,
the store's one way in, as the gateway's messages do.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from smtpgate.config.schema import GatewayConfig, parse_duration
from smtpgate.errors import AdminError, ConfigError, FieldProblem, NotFound
from smtpgate.policy.explain import Explanation, Facts, explain
from smtpgate.policy.profile import ProfileIndex
from smtpgate.queue.states import RecipientState
from smtpgate.queue.store import Filters, NewMessage, QueuedMessage, QueueStore

QUEUED, DEFERRED, HELD = RecipientState.QUEUED, RecipientState.DEFERRED, RecipientState.HELD
# action → (states it applies to, new state)
MOVES: dict[str, tuple[tuple[RecipientState, ...], RecipientState]] = {
    "retry": ((DEFERRED, QUEUED), QUEUED),
    "hold": ((QUEUED, DEFERRED), HELD),
    "release": ((HELD,), QUEUED),
    "bounce": ((QUEUED, DEFERRED, HELD), RecipientState.BOUNCE),
}


def when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def message_dict(message: QueuedMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "sender": message.sender,
        "arrival": when(message.arrival),
        "size": message.size,
        "kind": message.kind.label,
        "client": message.meta.get("client_ip"),
        "profile": message.meta.get("profile"),
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "last_attempt": when(r.last_attempt),
                "next_attempt": when(r.next_attempt),
                "last_reply": r.last_reply,
            }
            for r in message.recipients
        ],
    }


def queue_list(store: QueueStore, filters: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """The messages matching ``state``, ``sender``, ``recipient``, ``domain`` and
    ``older_than`` (an age such as ``2h``); any may be None."""
    older, state = filters.get("older_than"), filters.get("state")
    try:
        age = parse_duration(older) if older else None
    except ValueError as exc:
        raise ConfigError([FieldProblem("older_than", str(exc))]) from None
    try:
        chosen_state = RecipientState(state) if state else None
    except ValueError:
        raise ConfigError([FieldProblem("state", f"no recipient state {state!r}")]) from None
    chosen = Filters(
        chosen_state, filters.get("sender"), filters.get("recipient"),
        filters.get("domain"), age,
    )  # fmt: skip
    return [message_dict(m) for m in store.list(chosen)]


def queue_show(store: QueueStore, message_id: str) -> QueuedMessage:
    message = store.get(message_id)
    if message is None:
        raise NotFound(f"no message {message_id} in the queue")
    return message


def queue_act(store: QueueStore, action: str, message_id: str | None) -> dict[str, Any]:
    """Do ``action`` to one message (or, for retry, all with ``None``)."""
    if action == "delete":
        if message_id is None or not store.delete(message_id):
            raise NotFound(f"no message {message_id} in the queue")
        return {"action": action, "id": message_id, "recipients": None, "state": "deleted"}
    if action not in MOVES:
        raise AdminError(f"unknown queue action {action!r}")
    states, new = MOVES[action]
    if message_id is not None:
        queue_show(store, message_id)
    changed = store.set_state(message_id, states, new)
    return {
        "action": action,
        "id": message_id,
        "recipients": changed,
        "state": new,
        "at": when(store.clock.now()),
    }


def explain_policy(config: GatewayConfig, facts: Facts) -> Explanation:
    users = {
        c.username: p.name for p in config.connection_profiles for c in p.smtp_auth.credentials
    }
    return explain(config, ProfileIndex(config), users, facts)


def send_credentials(config: GatewayConfig, store: QueueStore, profile: str) -> dict[str, str]:
    """Queue the manual's *Send credentials* message for ``gateway.admin_address``."""
    from smtpgate.admin.credentials import credentials_message  # noqa: PLC0415 - CLI start-up
    from smtpgate.snapshot import Snapshot  # noqa: PLC0415

    snapshot = Snapshot.compile(config, certificates=False)
    envelope, body = credentials_message(snapshot, profile, store.bodies)
    store.ingest([NewMessage(envelope, body)])
    return {"queue_id": body.queue_id, "to": envelope.recipients[0].address}
