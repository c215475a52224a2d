"""``smtpgate cluster``: the gateways that share this configuration store.

``status`` lists every node that reports to the store (up, stale or down;
the revision it runs and how far behind the applied one; its last error;
its queue), locally or through a gateway's API. ``forget NODE`` removes a
node that has left from the list.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from smtpgate.cli.admin import api_for, data_dir_of, where_options


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = commands.add_parser("cluster", help="the gateways sharing this configuration")
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    status = actions.add_parser("status", help="every node: up/stale/down, revision, queue")
    forget = actions.add_parser("forget", help="remove a node that left from the list")
    forget.add_argument("node")
    forget.add_argument("--force", action="store_true", help="even if it is up")
    for parser in (status, forget):
        where_options(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "api", None):
        api = api_for(args)
        try:
            if args.cluster_command == "forget":
                path = f"/cluster/{args.node}" + ("?force=true" if args.force else "")
                api.call("DELETE", path)
                found: dict[str, Any] = {}
            else:
                found = api.call("GET", "/cluster")
        finally:
            api.close()
    else:
        found = _local(args)
    if args.cluster_command == "forget":
        print(f"node {args.node} forgotten")
    else:
        print(json.dumps(found, indent=1) if args.json else status_text(found))
    return 0


def _local(args: argparse.Namespace) -> dict[str, Any]:
    from smtpgate.admin import nodes  # noqa: PLC0415
    from smtpgate.config.store import ConfigStore  # noqa: PLC0415

    store = ConfigStore.open(data_dir_of(args))
    try:
        if args.cluster_command == "forget":
            nodes.forget(store, args.node, time.time(), force=args.force)
            return {}
        return nodes.cluster(store, time.time())
    finally:
        store.close()


def status_text(found: dict[str, Any]) -> str:
    """One line per node, as an administrator reads it."""
    lines = [f"applied revision: {found['applied_revision']}"]
    if not found["nodes"]:
        lines.append("no gateway has reported to this store")
    for node in found["nodes"]:
        queue = node["queue"] or {}
        waiting = sum(v for k, v in queue.items() if k not in ("delivered", "bounced"))
        lag = "" if not node["lag"] else f", {node['lag']} behind"
        line = (
            f"{node['node']}: {node['state']} (seen {node['seen_seconds_ago']:g} s ago), "
            f"revision {node['running_revision']}{lag}, queue {waiting}"
        )
        if node["roles"]:
            line += f", roles {', '.join(node['roles'])}"
        if node["error"]:
            line += f"; error: {node['error']}"
        lines.append(line)
    return "\n".join(lines)
