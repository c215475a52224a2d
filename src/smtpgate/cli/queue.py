"""``smtpgate queue``: Postfix-like tools over the queue of a data directory.

``list`` (mailq), ``show`` (postcat -q), ``retry`` (postqueue -f / -i),
``hold`` and ``release`` (postsuper -h / -H), ``delete`` (postsuper -d),
``bounce`` (postsuper -b... with a report to the sender). They work on the
queue database directly (a running gateway notices within a second), or
through a running gateway's API with ``--api URL``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from smtpgate.admin.operations import message_dict, queue_act, queue_list, queue_show
from smtpgate.cli import args as arg_types
from smtpgate.cli.admin import api_for, data_dir_of, where_options
from smtpgate.errors import NotFound
from smtpgate.queue.states import PENDING
from smtpgate.queue.store import QueueStore

if TYPE_CHECKING:
    from smtpgate.cli.backend import ApiBackend

ACTIONS = ("list", "show", "retry", "hold", "release", "delete", "bounce")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser("queue", help="inspect and act on the mail queue")
    actions = queue.add_subparsers(dest="queue_command", required=True)
    listing = actions.add_parser("list", help="messages in the queue")
    listing.add_argument(
        "--state",
        choices=[state.value for state in PENDING],  # plain strings in the help and errors
        help="recipients waiting: queued, deferred, held, or bounce (a report is due)",
    )
    listing.add_argument("--sender")
    listing.add_argument("--recipient")
    listing.add_argument("--domain", help="recipient domain")
    listing.add_argument("--older-than", type=arg_types.age, help="age, e.g. 30m, 2h, 1d")
    show = actions.add_parser("show", help="one message: envelope and per-recipient history")
    show.add_argument("id")
    retry = actions.add_parser("retry", help="try deferred recipients now")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--all", action="store_true")
    for name, text in (
        ("hold", "keep a message from being delivered"),
        ("release", "let a held message go again"),
        ("delete", "remove a message without a report"),
        ("bounce", "return a message to its sender with a report"),
    ):
        actions.add_parser(name, help=text).add_argument("id")
    for parser in (listing, show, retry, *[actions.choices[a] for a in ACTIONS[3:]]):
        where_options(parser)


def _table(messages: list[dict[str, Any]]) -> str:
    lines = [f"{'ID':<22} {'SIZE':>9}  {'ARRIVAL':<19}  SENDER / RECIPIENTS"]
    for m in messages:
        lines.append(f"{m['id']:<22} {m['size']:>9}  {m['arrival']:<19}  <{m['sender']}>")
        for r in m["recipients"]:
            reply = f"  ({r['last_reply']})" if r["last_reply"] else ""
            lines.append(f"{'':<55}{r['address']}  [{r['state']}, {r['attempts']} attempts]{reply}")
    lines.append(f"-- {len(messages)} message(s)")
    return "\n".join(lines)


class Target(Protocol):
    def list(self, filters: dict[str, str | None]) -> list[dict[str, Any]]: ...
    def show(self, message_id: str) -> dict[str, Any]: ...
    def act(self, action: str, message_id: str | None) -> dict[str, Any]: ...


@dataclass
class LocalQueue:
    """The queue database of a data directory, used directly; changes go to the
    configuration store's audit log (when there is one) as ``cli:USER``."""

    store: QueueStore
    data_dir: Path

    def list(self, filters: dict[str, str | None]) -> list[dict[str, Any]]:
        return queue_list(self.store, filters)

    def show(self, message_id: str) -> dict[str, Any]:
        return message_dict(queue_show(self.store, message_id))

    def act(self, action: str, message_id: str | None) -> dict[str, Any]:
        result = queue_act(self.store, action, message_id)
        self._audit(f"queue.{action}", message_id or "all")
        return result

    def _audit(self, action: str, detail: str) -> None:
        from smtpgate.cli.backend import record_locally  # noqa: PLC0415

        record_locally(self.data_dir, action, detail)


@dataclass
class RemoteQueue:
    """A running gateway's queue, through its API."""

    api: ApiBackend

    def list(self, filters: dict[str, str | None]) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        found: list[dict[str, Any]] = self.api.call("GET", "/queue", params=params)
        return found

    def show(self, message_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api.call("GET", f"/queue/{message_id}")
        return found

    def act(self, action: str, message_id: str | None) -> dict[str, Any]:
        if message_id is None:
            result: dict[str, Any] = self.api.call("POST", "/queue-retry-all")
        elif action == "delete":
            result = self.api.call("DELETE", f"/queue/{message_id}")
        else:
            result = self.api.call("POST", f"/queue/{message_id}/{action}")
        return result


def run(args: argparse.Namespace) -> int:
    if args.api:
        api = api_for(args)
        try:
            return _act(RemoteQueue(api), args)
        finally:
            api.close()
    data_dir = data_dir_of(args)
    store = QueueStore(data_dir / "queue")
    try:
        return _act(LocalQueue(store, data_dir), args)
    finally:
        store.close()


def _act(queue: Target, args: argparse.Namespace) -> int:
    action = args.queue_command
    try:
        if action == "list":
            filters = {
                "state": args.state,
                "sender": args.sender,
                "recipient": args.recipient,
                "domain": args.domain,
                "older_than": args.older_than,
            }
            messages = queue.list(filters)
            print(json.dumps(messages, indent=1) if args.json else _table(messages))
            return 0
        if action == "show":
            print(json.dumps(queue.show(args.id), indent=1))
            return 0
        target = None if getattr(args, "all", False) else args.id
        result = queue.act(action, target)
    except NotFound as exc:
        print(exc)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    elif action == "delete":
        print(f"{args.id}: deleted")
    else:
        print(
            f"{action}: {result['recipients']} recipient(s) now {result['state']}"
            + (f" at {result['at']}" if result["state"] == "queued" else "")
        )
    return 0
