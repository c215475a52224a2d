"""``smtpgate quarantine``: the messages held by a scanner's verdict.

``list``, ``show`` (envelope, verdicts, header section), ``release`` (into
the queue, delivered as if clean) and ``delete``. They work on the data
directory's quarantine and queue directly, as ``smtpgate queue`` does (a
running gateway's queue manager picks a released message up within a
second), or through a running gateway's API with ``--api URL``. Release and
delete are audited (``cli:USER`` locally, the token's name through the API).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from smtpgate.cli.admin import api_for, data_dir_of, where_options
from smtpgate.content import quarantine as q
from smtpgate.errors import NotFound

ACTIONS = {
    "list": "the quarantined messages, oldest first",
    "show": "one message: envelope, verdicts, header section",
    "release": "deliver a message as if it had been clean",
    "delete": "remove a message for good",
}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("quarantine", help="messages held by a scanner's verdict")
    actions = parser.add_subparsers(dest="quarantine_command", required=True)
    for name, text in ACTIONS.items():
        action = actions.add_parser(name, help=text)
        if name != "list":
            action.add_argument("id")
        where_options(action)


def _table(entries: list[dict[str, Any]]) -> str:
    lines = [f"{'ID':<22} {'SIZE':>9}  {'HELD':<19}  SENDER / RECIPIENTS / WHY"]
    for e in entries:
        lines.append(f"{e['id']:<22} {e['size']:>9}  {e['held_at']:<19}  <{e['sender']}>")
        lines.extend(f"{'':<55}{r}" for r in e["recipients"])
        lines.append(f"{'':<55}{e['scanner']}: {e['reason']}")
    lines.append(f"-- {len(entries)} message(s)")
    return "\n".join(lines)


def _local(args: argparse.Namespace) -> Any:
    from smtpgate.cli.backend import record_locally  # noqa: PLC0415

    data_dir = data_dir_of(args)
    action = args.quarantine_command
    if action == "list":
        store = q.QuarantineStore(q.quarantine_dir(data_dir))
        return [q.entry_dict(h) for h in store.entries()]
    if action == "show":
        return q.show_dict(q.QuarantineStore(q.quarantine_dir(data_dir)), args.id)
    result = q.release(data_dir, args.id) if action == "release" else q.delete(data_dir, args.id)
    record_locally(data_dir, f"quarantine.{action}", args.id)
    return result


def _remote(args: argparse.Namespace) -> Any:
    api = api_for(args)
    try:
        action = args.quarantine_command
        if action == "list":
            return api.call("GET", "/quarantine")
        if action == "show":
            return api.call("GET", f"/quarantine/{args.id}")
        if action == "delete":
            return api.call("DELETE", f"/quarantine/{args.id}")
        return api.call("POST", f"/quarantine/{args.id}/release")
    finally:
        api.close()


def run(args: argparse.Namespace) -> int:
    try:
        result = _remote(args) if args.api else _local(args)
    except NotFound as exc:
        print(exc)
        return 1
    action = args.quarantine_command
    if args.json or action == "show":
        print(json.dumps(result, indent=1))
    elif action == "list":
        print(_table(result))
    else:
        print(f"{args.id}: {result['result']}")
    return 0
