"""``smtpgate queue``: Postfix-like tools over the queue of a data directory.

``list`` (mailq), ``show`` (postcat -q), ``retry`` (postqueue -f / -i),
``hold`` and ``release`` (postsuper -h / -H), ``delete`` (postsuper -d),
``bounce`` (postsuper -b... with a report to the sender). The actions take one
queue ID, or filters (``--state deferred --domain x.example``): then they
print the count and what they would do, and act only with ``--yes``. They work on the
queue database directly (a running gateway notices within a second), or
through a running gateway's API with ``--api URL``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from smtpgate.admin.operations import message_dict, queue_act, queue_list, queue_show
from smtpgate.cli import args as arg_types
from smtpgate.cli.admin import api_for, data_dir_of, where_options
from smtpgate.errors import AdminError, NotFound
from smtpgate.queue.states import PENDING
from smtpgate.queue.store import QueueStore

if TYPE_CHECKING:
    from smtpgate.cli.backend import ApiBackend

ACTIONS = ("list", "show", "retry", "hold", "release", "delete", "bounce")
CHUNK = 1 << 16  # a large body is copied to the output in pieces


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser("queue", help="inspect and act on the mail queue")
    actions = queue.add_subparsers(dest="queue_command", required=True)
    listing = actions.add_parser("list", help="messages in the queue")
    _filter_options(listing)
    show = actions.add_parser("show", help="one message: envelope and per-recipient history")
    show.add_argument("id")
    show.add_argument(
        "--body", action="store_true", help="the envelope, then the message as stored (postcat -q)"
    )
    retry = actions.add_parser("retry", help="try deferred recipients now")
    retry.add_argument("--all", action="store_true", help="every waiting recipient (postqueue -f)")
    for name, text in (
        ("hold", "keep a message from being delivered"),
        ("release", "let a held message go again"),
        ("delete", "remove a message without a report"),
        ("bounce", "return a message to its sender with a report"),
    ):
        actions.add_parser(name, help=text)
    for name in ACTIONS[2:]:
        parser = actions.choices[name]
        parser.add_argument("id", nargs="?", help="a queue ID; or choose messages by filters")
        _filter_options(parser)
        parser.add_argument(
            "--yes", action="store_true", help="act on every message the filters match"
        )
    for parser in (listing, show, *[actions.choices[a] for a in ACTIONS[2:]]):
        where_options(parser)


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        choices=[state.value for state in PENDING],  # plain strings in the help and errors
        help="recipients waiting: queued, deferred, held, or bounce (a report is due)",
    )
    parser.add_argument("--sender")
    parser.add_argument("--recipient")
    parser.add_argument("--domain", help="recipient domain")
    parser.add_argument("--older-than", type=arg_types.age, help="age, e.g. 30m, 2h, 1d")


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
    def body(self, message_id: str) -> bytes | Path: ...


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

    def body(self, message_id: str) -> bytes | Path:
        found = self.store.body(message_id)
        if found is None:
            raise NotFound(f"no message {message_id} in the queue")
        return found

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

    def body(self, message_id: str) -> bytes | Path:
        raise AdminError(
            "--body reads the queue database: use --config or --data-dir on the gateway's host"
        )

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


def _filters(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        "state": args.state,
        "sender": args.sender,
        "recipient": args.recipient,
        "domain": args.domain,
        "older_than": args.older_than,
    }


def _act(queue: Target, args: argparse.Namespace) -> int:
    action = args.queue_command
    try:
        if action == "list":
            messages = queue.list(_filters(args))
            print(json.dumps(messages, indent=1) if args.json else _table(messages))
            return 0
        if action == "show":
            if args.body:
                _print_with_body(queue.show(args.id), queue.body(args.id))
            else:
                print(json.dumps(queue.show(args.id), indent=1))
            return 0
        if action == "retry" and args.all:  # postqueue -f: harmless, no confirmation
            return _print_result(args, queue.act("retry", None))
        filters = _filters(args)
        chosen = any(value is not None for value in filters.values())
        if args.id is not None and chosen:
            print(f"smtpgate queue {action}: give a queue ID or filters, not both", file=sys.stderr)
            return 2
        if args.id is None:
            if not chosen:
                print(
                    f"smtpgate queue {action}: give a queue ID, or filters (--state, --sender, "
                    "--recipient, --domain, --older-than) and --yes",
                    file=sys.stderr,
                )
                return 2
            return _bulk(queue, action, filters, yes=args.yes, as_json=args.json)
        return _print_result(args, queue.act(action, args.id))
    except NotFound as exc:
        print(exc)
        return 1


def _print_result(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(result, indent=1))
    elif result["state"] == "deleted":
        print(f"{result['id']}: deleted")
    else:
        print(
            f"{result['action']}: {result['recipients']} recipient(s) now {result['state']}"
            + (f" at {result['at']}" if result["state"] == "queued" else "")
        )
    return 0


def _bulk(
    queue: Target, action: str, filters: dict[str, str | None], *, yes: bool, as_json: bool
) -> int:
    """Every message the filters match (postsuper -d ALL deferred, by domain): the
    count, then what would be done (exit 1) or, with ``--yes``, what was done.
    An action works on whole messages, as postsuper's do."""
    matched = [m["id"] for m in queue.list(filters)]
    if not yes:
        if as_json:
            print(json.dumps({"action": action, "matched": matched, "done": False}, indent=1))
        else:
            print(f"{len(matched)} message(s) match")
            for message_id in matched:
                print(f"would {action} {message_id}")
            if matched:
                print(f"nothing done: add --yes to {action} them")
        return 1 if matched else 0
    results, gone = [], []
    for message_id in matched:
        try:
            results.append(queue.act(action, message_id))
        except NotFound:  # delivered or removed since the list
            gone.append(message_id)
    if as_json:
        print(json.dumps({"action": action, "matched": matched, "done": results, "gone": gone}))
        return 0
    print(f"{len(matched)} message(s) match")
    for result in results:
        recipients = "" if result["recipients"] is None else f" ({result['recipients']} recipients)"
        print(f"{result['id']}: {action} done, now {result['state']}{recipients}")
    for message_id in gone:
        print(f"{message_id}: no longer in the queue")
    return 0


def _print_with_body(message: dict[str, Any], body: bytes | Path) -> None:
    """Like ``postcat -q``: the envelope, then the message exactly as queued."""
    lines = [
        "*** ENVELOPE ***",
        f"queue_id: {message['id']}",
        f"arrival: {message['arrival']}",
        f"size: {message['size']}",
        f"sender: <{message['sender']}>",
    ]
    lines += [f"recipient: <{r['address']}> [{r['state']}]" for r in message["recipients"]]
    print("\n".join([*lines, "*** MESSAGE CONTENTS ***"]))
    sys.stdout.flush()
    out = sys.stdout.buffer
    if isinstance(body, bytes):
        out.write(body)
    else:
        with body.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                out.write(chunk)
    out.write(b"*** END OF MESSAGE ***\n")
    out.flush()
