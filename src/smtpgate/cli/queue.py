"""``smtpgate queue``: Postfix-like tools over the queue of a data directory.

``list`` (mailq), ``show`` (postcat -q), ``retry`` (postqueue -f / -i),
``hold`` and ``release`` (postsuper -h / -H), ``delete`` (postsuper -d),
``bounce`` (postsuper -b... with a report to the sender). They work on the
queue database directly; a running gateway notices within a second.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smtpgate.admin.operations import message_dict, queue_act, queue_list, queue_show, when
from smtpgate.config.schema import GatewayConfig, parse_duration
from smtpgate.errors import NotFound
from smtpgate.queue.store import Filters, QueuedMessage, QueueStore

ACTIONS = ("list", "show", "retry", "hold", "release", "delete", "bounce")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser("queue", help="inspect and act on the mail queue")
    actions = queue.add_subparsers(dest="queue_command", required=True)
    listing = actions.add_parser("list", help="messages in the queue")
    listing.add_argument("--state", choices=["queued", "deferred", "held", "bounce"])
    listing.add_argument("--sender")
    listing.add_argument("--recipient")
    listing.add_argument("--domain", help="recipient domain")
    listing.add_argument("--older-than", help="age, e.g. 30m, 2h, 1d")
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
        parser.add_argument("--config", type=Path, required=True)
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _table(messages: list[QueuedMessage]) -> str:
    lines = [f"{'ID':<22} {'SIZE':>9}  {'ARRIVAL':<19}  SENDER / RECIPIENTS"]
    for m in messages:
        lines.append(f"{m.id:<22} {m.size:>9}  {when(m.arrival):<19}  <{m.sender}>")
        for r in m.recipients:
            reply = f"  ({r.last_reply})" if r.last_reply else ""
            lines.append(f"{'':<55}{r.address}  [{r.state}, {r.attempts} attempts]{reply}")
    lines.append(f"-- {len(messages)} message(s)")
    return "\n".join(lines)


def run(args: argparse.Namespace, config: GatewayConfig) -> int:
    store = QueueStore(config.gateway.data_dir / "queue")
    try:
        return _act(store, args)
    finally:
        store.close()


def _act(store: QueueStore, args: argparse.Namespace) -> int:
    action = args.queue_command
    try:
        if action == "list":
            older = parse_duration(args.older_than) if args.older_than else None
            filters = Filters(args.state, args.sender, args.recipient, args.domain, older)
            messages = queue_list(store, filters)
            print(
                json.dumps([message_dict(m) for m in messages], indent=1)
                if args.json
                else _table(messages)
            )
            return 0
        if action == "show":
            print(json.dumps(message_dict(queue_show(store, args.id)), indent=1))
            return 0
        target = None if getattr(args, "all", False) else args.id
        result = queue_act(store, action, target)
    except NotFound as exc:
        print(exc)
        return 1
    if action == "delete":
        print(f"{args.id}: deleted")
        return 0
    print(
        f"{action}: {result['recipients']} recipient(s) now {result['state']}"
        + (f" at {result['at']}" if result["state"] == "queued" else "")
    )
    return 0
