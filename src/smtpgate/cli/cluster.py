"""``smtpgate cluster``: the gateways that share this configuration store.

``status`` lists every node that reports to the store (up, stale or down;
the revision it runs and how far behind the applied one; its last error;
its queue), locally or through a gateway's API. ``forget NODE`` removes a
node that has left from the list.

``key export`` and ``key import`` copy the secret key (``data_dir/keys/
secret.key``) from one node to another: every node of a cluster needs the
same one (``smtpgate.admin.keys``). They work on this host's files only,
never through the API, and never show the key anywhere but where asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtpgate.cli import args as arg_types
from smtpgate.cli.admin import api_for, data_dir_of, existing_store, where_options
from smtpgate.errors import AdminError, ConfigError

if TYPE_CHECKING:
    from smtpgate.config.store import ConfigStore


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = commands.add_parser("cluster", help="the gateways sharing this configuration")
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    status = actions.add_parser("status", help="every node: up/stale/down, revision, queue")
    forget = actions.add_parser("forget", help="remove a node that left from the list")
    forget.add_argument("node")
    forget.add_argument("--force", action="store_true", help="even if it is up")
    for parser in (status, forget):
        where_options(parser)
    key = actions.add_parser("key", help="copy the secret key between nodes")
    key_actions = key.add_subparsers(dest="key_command", required=True)
    export = key_actions.add_parser("export", help="print this node's secret key (or --out)")
    export.add_argument("--out", type=Path, help="write it to this new file (0600) instead")
    install = key_actions.add_parser("import", help="install a peer's key as this node's")
    install.add_argument("file", metavar="PATH", help="the exported key; - for standard input")
    install.add_argument(
        "--force", action="store_true", help="replace a different key (or not the cluster's)"
    )
    for parser in (export, install):
        target = parser.add_mutually_exclusive_group()
        target.add_argument("--config", type=Path, help="the configuration file")
        target.add_argument("--data-dir", type=arg_types.data_dir, help="the data directory")


def run(args: argparse.Namespace) -> int:
    if args.cluster_command == "key":
        return export_key(args) if args.key_command == "export" else import_key(args)
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

    if getattr(args, "data_dir", None) is not None:
        store = existing_store(Path(args.data_dir))
    else:
        store = ConfigStore.open(data_dir_of(args))
    try:
        if args.cluster_command == "forget":
            nodes.forget(store, args.node, time.time(), force=args.force)
            return {}
        found = nodes.cluster(store, time.time())
        found["secret_key"] = _key_state(store, data_dir_of(args))
        return found
    finally:
        store.close()


def _key_state(store: ConfigStore, data_dir: Path) -> dict[str, str | None]:
    """The cluster's key fingerprint and how this node's compares: same,
    different or none."""
    from smtpgate.admin.keys import cluster_fingerprint, node_fingerprint  # noqa: PLC0415

    recorded = cluster_fingerprint(store)
    try:
        mine = node_fingerprint(data_dir)
    except ConfigError as exc:  # unreadable, or not a key
        return {"fingerprint": recorded, "this_node": f"unusable: {exc.problems[0].message}"}
    if mine is None:
        this_node = "none"
    elif recorded is None:
        this_node = f"fingerprint {mine}"
    else:
        this_node = "same" if mine == recorded else f"different, fingerprint {mine}"
    return {"fingerprint": recorded, "this_node": this_node}


def status_text(found: dict[str, Any]) -> str:
    """One line per node, as an administrator reads it."""
    lines = [f"applied revision: {found['applied_revision']}"]
    if not found["nodes"]:
        lines.append("no gateway has reported to this store")
    for node in found["nodes"]:
        queue = node["queue"] or {}
        waiting = sum(v for k, v in queue.items() if k not in ("delivered", "bounced"))
        lag = "" if not node["lag"] else f", {node['lag']} behind"
        seen = "stopped" if node.get("stopped") else "seen"
        line = (
            f"{node['node']}: {node['state']} ({seen} {node['seen_seconds_ago']:g} s ago), "
            f"revision {node['running_revision']}{lag}, queue {waiting}"
        )
        if node["roles"]:
            line += f", roles {', '.join(node['roles'])}"
        if node.get("workers", 1) > 1:
            line += f", {node['workers']} workers"
        if node["error"]:
            line += f"; error: {node['error']}"
        down = [
            f"{name} {state}" for name, state in node.get("scanners", {}).items() if state != "up"
        ]
        if down:
            line += "; scanner " + ", ".join(down)
        lines.append(line)
    key = found.get("secret_key")
    if key is not None:
        recorded = f"fingerprint {key['fingerprint']}" if key["fingerprint"] else "none recorded"
        lines.append(f"secret key: {recorded} (this node: {key['this_node']})")
    return "\n".join(lines)


# -- the secret key ------------------------------------------------------------


def export_key(args: argparse.Namespace) -> int:
    from smtpgate.config.secret import fingerprint, key_path, read_key  # noqa: PLC0415

    data_dir = data_dir_of(args)
    key = read_key(data_dir)
    if key is None:
        raise AdminError(
            f"this node has no secret key ({key_path(data_dir)}): export it from a node "
            "that has encrypted a secret"
        )
    if args.out is None:
        print(key.decode("ascii"))
        return 0
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AdminError(f"{args.out} exists: not overwritten") from None
    except OSError as exc:
        raise AdminError(f"{args.out}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(key + b"\n")
    print(f"secret key (fingerprint {fingerprint(key)}) written to {args.out}", file=sys.stderr)
    return 0


def import_key(args: argparse.Namespace) -> int:
    from smtpgate.config.secret import (  # noqa: PLC0415
        fingerprint,
        install_key,
        key_path,
        parse_key,
        read_key,
    )

    source = "standard input" if args.file == "-" else args.file
    try:
        text = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise AdminError(f"{source}: {exc.strerror}") from None
    key = parse_key(text)
    if key is None:
        raise AdminError(
            f"{source} is not a smtpgate secret key (a Fernet key: one line of 44 "
            "base64 characters, as `smtpgate cluster key export` prints it)"
        )
    data_dir = data_dir_of(args)
    path, given = key_path(data_dir), fingerprint(key)
    current = read_key(data_dir)
    if current is not None and fingerprint(current) == given:
        print(f"this node has this key already (fingerprint {given}): nothing to do")
        return 0
    recorded = _cluster_fingerprint(args, data_dir)
    if recorded is not None and recorded != given and not args.force:
        raise AdminError(
            f"the key given (fingerprint {given}) is not the cluster's (fingerprint "
            f"{recorded}, recorded in the configuration store): export the key of a "
            "running peer; --force installs it all the same"
        )
    if current is not None and not args.force:
        raise AdminError(
            f"this node has a different secret key ({path}, fingerprint "
            f"{fingerprint(current)}); secrets encrypted with it could not be read "
            "after replacing it: --force replaces it"
        )
    if current is not None:
        install_key(data_dir, key, replace=True)
    elif not install_key(data_dir, key, replace=False):
        raise AdminError(f"{path} was created meanwhile: run the import again")
    print(f"secret key installed in {path} (fingerprint {given})")
    if recorded is not None and recorded != given:
        print(
            f"warning: the cluster's key has fingerprint {recorded}: "
            "`smtpgate serve` will refuse to start with this one",
            file=sys.stderr,
        )
    return 0


def _cluster_fingerprint(args: argparse.Namespace, data_dir: Path) -> str | None:
    """The fingerprint the store recorded, when this node knows a store (one is
    never created here); a store out of reach is said, not fatal."""
    from smtpgate.admin.keys import cluster_fingerprint  # noqa: PLC0415
    from smtpgate.cli.admin import store_of  # noqa: PLC0415
    from smtpgate.config.store import store_exists  # noqa: PLC0415

    named = args.config is not None and arg_types.load_file(args.config).gateway.store
    if not (store_exists(data_dir) or named):
        return None
    try:
        store = store_of(args)
    except AdminError as exc:
        print(f"warning: cannot compare with the cluster's key: {exc}", file=sys.stderr)
        return None
    try:
        return cluster_fingerprint(store)
    finally:
        store.close()
