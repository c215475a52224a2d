"""``smtpgate trace``: what happened to a message, from the tracking records.

By queue id (``smtpgate trace ID``), Message-ID, sender, recipient and a time
window (``--since``/``--until``: ISO 8601, Unix seconds or an age such as
``2h``); every criterion given must match. It reads this node's
``data_dir/tracking.db`` directly (``--config``/``--data-dir``) or asks a
running gateway's API (``--api URL``): ``GET /api/v1/trace``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from smtpgate.cli.admin import api_for, data_dir_of, where_options
from smtpgate.errors import AdminError
from smtpgate.observe import tracking


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("trace", help="what happened to a message (tracking records)")
    parser.add_argument("queue_id", nargs="?", help="the queue id (as in the log)")
    parser.add_argument("--message-id", help="the Message-ID header, with or without <>")
    parser.add_argument("--sender", help="the envelope sender (<> for the null sender)")
    parser.add_argument("--recipient", help="an envelope recipient")
    parser.add_argument("--since", help="from this time (ISO 8601, Unix seconds) or age (2h)")
    parser.add_argument("--until", help="up to this time, or age")
    parser.add_argument("--limit", type=int, default=100, help="at most this many messages")
    where_options(parser)


def _criteria(args: argparse.Namespace) -> dict[str, Any]:
    found = {
        "queue_id": args.queue_id,
        "message_id": args.message_id,
        "sender": "" if args.sender == "<>" else args.sender,
        "recipient": args.recipient,
        "since": args.since,
        "until": args.until,
        "limit": args.limit,
    }
    return {k: v for k, v in found.items() if v is not None}


def _local(args: argparse.Namespace, criteria: dict[str, Any]) -> list[dict[str, Any]]:
    times = {}
    for name in ("since", "until"):
        if name in criteria:
            try:
                times[name] = tracking.parse_when(criteria[name])
            except ValueError:
                raise AdminError(
                    f"--{name}: a time (ISO 8601, Unix seconds) or an age (2h)"
                ) from None
    query = tracking.Query(
        criteria.get("queue_id"), criteria.get("message_id"), criteria.get("sender"),
        criteria.get("recipient"), times.get("since"), times.get("until"),
        max(1, min(args.limit, tracking.MAX_RESULTS)),
    )  # fmt: skip
    return tracking.search(data_dir_of(args), query)


def _remote(args: argparse.Namespace, criteria: dict[str, Any]) -> list[dict[str, Any]]:
    api = api_for(args)
    try:
        found: list[dict[str, Any]] = api.call("GET", "/trace", params=criteria)
        return found
    finally:
        api.close()


def run(args: argparse.Namespace) -> int:
    criteria = _criteria(args)
    records = _remote(args, criteria) if args.api else _local(args, criteria)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        for line in tracking.records_text(records):
            print(line)
        print(f"-- {len(records)} message(s)")
    return 0 if records else 1
