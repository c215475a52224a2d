"""``policy explain``, ``credentials encrypt|send``, ``connector verify|status``:
tools that act on the applied configuration, locally or through a running
gateway's API (``--api URL``). Both ways print the same.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from smtpgate.cli import args as arg_types
from smtpgate.cli.admin import api_for, data_dir_of, local_of, where_options
from smtpgate.cli.args import load_file
from smtpgate.config.load import parse_config
from smtpgate.config.schema import GatewayConfig
from smtpgate.errors import ConfigError, NotFound
from smtpgate.observe.log import configure

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def add_policy(commands: Commands) -> None:
    policy = commands.add_parser("policy", help="policy tools")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    explain = policy_commands.add_parser(
        "explain", help="show every decision the gateway would make for a client"
    )
    where_options(explain)
    explain.add_argument("--client-ip", required=True, type=arg_types.ip_address)
    explain.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="a forward-confirmed host name of the client (no DNS lookup)",
    )
    explain.add_argument(
        "--lookup",
        action="store_true",
        help="find confirmed host names with DNS (gateway.dns), and the recipient"
        " domains' DANE and MTA-STS policies",
    )
    explain.add_argument("--helo")
    explain.add_argument("--sender")
    explain.add_argument("--recipient", action="append", default=[])
    explain.add_argument("--tls", action="store_true", help="the client has done STARTTLS")
    explain.add_argument("--auth", metavar="USER", help="the client authenticated as USER")
    explain.add_argument(
        "--client-certificate",
        metavar="SUBJECT",
        help="the client presented this verified certificate",
    )
    explain.add_argument(
        "--listener",
        metavar="NAME",
        help="the client connected to this listener (its security applies at MAIL)",
    )


def add_credentials(commands: Commands) -> None:
    credentials = commands.add_parser("credentials", help="SMTP AUTH credentials")
    cred_commands = credentials.add_subparsers(dest="credentials_command", required=True)
    encrypt = cred_commands.add_parser(
        "encrypt", help="encrypt a password (read from standard input) for the configuration"
    )
    where_options(encrypt, json_output=False)
    send = cred_commands.add_parser(
        "send", help="mail a profile's user names and passwords to gateway.admin_address"
    )
    send.add_argument("profile")
    where_options(send, json_output=False)


def add_connector_verify(commands: Commands) -> None:
    connector = commands.choices["connector"]
    connector_commands = next(
        a for a in connector._actions if isinstance(a, argparse._SubParsersAction)
    )
    verify = connector_commands.add_parser(
        "verify",
        help="connect, EHLO, STARTTLS and AUTH as the connector would, step by step "
        "(a POP3 connector: connect, STLS, certificate, login to each mailbox)",
    )
    verify.add_argument("name")
    where_options(verify, json_output=False)
    verify.add_argument("--domain", help="recipient domain to look up (direct delivery)")
    status = connector_commands.add_parser(
        "status", help="each send connector's health per destination: up, failing or down"
    )
    where_options(status)


def _when(value: object) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))


def connector_status(args: argparse.Namespace) -> int:
    """``connector status``: what the running gateway last wrote of its connectors'
    health (``data_dir/connectors.json``), or the API's ``/connectors/status``."""
    from smtpgate.delivery.health import read_status, status_table  # noqa: PLC0415

    if args.api:
        api = api_for(args)
        try:
            rows: list[dict[str, Any]] = api.call("GET", "/connectors/status")
        finally:
            api.close()
    else:
        config = applied_config(args)
        names = [c.name for c in config.send_connectors]
        rows = status_table(read_status(config.gateway.data_dir), names)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'CONNECTOR':<20} {'DESTINATION':<30} {'STATE':<8} FAILS LAST-SUCCESS         ERROR")
    for row in rows:
        print(
            f"{row['connector']:<20} {row['destination']:<30} {row['state']:<8} "
            f"{row.get('consecutive_failures', 0):>5} {_when(row.get('last_success')):<20} "
            f"{row.get('last_error') or '-'}"
        )
    return 0 if all(row["state"] != "down" for row in rows) else 1


def applied_config(args: argparse.Namespace) -> GatewayConfig:
    """The configuration the gateway runs: the store's applied revision, or the
    file itself while the store is empty (before the first ``smtpgate serve``)."""
    from smtpgate.admin import nodes  # noqa: PLC0415
    from smtpgate.config.document import merge, shared_part  # noqa: PLC0415
    from smtpgate.config.store import ConfigStore, store_exists  # noqa: PLC0415

    data_dir = data_dir_of(args)
    file_config = load_file(args.config) if args.config else None
    if store_exists(data_dir):
        store = ConfigStore.open(data_dir)
        try:
            revision = store.applied()
        finally:
            store.close()
        if revision is not None:  # the store's shared settings, this node's local ones
            local = local_of(args) or nodes.known_local(data_dir)
            return parse_config(merge(shared_part(revision.document), local))
    if file_config is None:
        raise NotFound(f"no applied configuration in {data_dir}")
    return file_config


def explain(args: argparse.Namespace) -> int:
    from smtpgate.policy.explain import UnknownListenerError, explanation_text  # noqa: PLC0415

    facts: dict[str, Any] = {
        "client_ip": args.client_ip,
        "confirmed_names": list(args.hostname),
        "helo": args.helo,
        "sender": args.sender,
        "recipients": list(args.recipient),
        "tls": args.tls,
        "auth_user": args.auth,
        "client_certificate": args.client_certificate,
        "listener": args.listener,
    }
    try:
        if getattr(args, "api", None):
            result = _explain_by_api(args, facts)
        else:
            result = _explain_locally(args, facts)
    except UnknownListenerError as exc:  # bad usage, as a bad --client-ip is (exit 2)
        print(f"smtpgate policy explain: error: argument --listener: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else explanation_text(result))
    return 0


def _explain_by_api(args: argparse.Namespace, facts: dict[str, Any]) -> dict[str, Any]:
    from smtpgate.policy.explain import UnknownListenerError  # noqa: PLC0415

    api = api_for(args)
    try:
        result: dict[str, Any] = api.call(
            "POST", "/policy/explain", json={**facts, "lookup": args.lookup}
        )
    except ConfigError as exc:  # 422: the API names the field
        listener = [p.message for p in exc.problems if p.path == "listener"]
        if listener:
            raise UnknownListenerError(listener[0]) from None
        raise
    finally:
        api.close()
    return result


def _explain_locally(args: argparse.Namespace, facts: dict[str, Any]) -> dict[str, Any]:
    from smtpgate.admin.operations import explain_policy  # noqa: PLC0415
    from smtpgate.dns import DnsResolver, confirmed_names  # noqa: PLC0415
    from smtpgate.policy.explain import Facts  # noqa: PLC0415

    config = applied_config(args)
    if args.lookup:
        from smtpgate.delivery.published import lookup_published  # noqa: PLC0415

        resolver = DnsResolver(config.gateway.dns)
        facts["confirmed_names"] += asyncio.run(confirmed_names(resolver, args.client_ip))
        domains = [r.rpartition("@")[2] for r in facts["recipients"]]
        facts["published"] = asyncio.run(lookup_published(config, domains))
    return explain_policy(config, Facts(**facts)).as_dict()


def encrypt(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("smtpgate credentials encrypt: empty password", file=sys.stderr)
        return 2
    if args.api:
        api = api_for(args)
        try:
            print(api.call("POST", "/secrets/encrypt", json={"value": password})["value"])
        finally:
            api.close()
        return 0
    from smtpgate.admin.keys import encryption_key  # noqa: PLC0415
    from smtpgate.config.secret import encrypt as encrypt_with  # noqa: PLC0415
    from smtpgate.config.secret import load_key  # noqa: PLC0415
    from smtpgate.config.store import ConfigStore, store_exists  # noqa: PLC0415

    data_dir = data_dir_of(args)
    if not store_exists(data_dir):  # before the first serve: the key is checked then
        print(encrypt_with(load_key(data_dir, create=True), password))
        return 0
    store = ConfigStore.open(data_dir)
    try:  # a peer of a cluster encrypts with the cluster's key, never its own
        print(encrypt_with(encryption_key(store, data_dir), password))
    finally:
        store.close()
    return 0


def send_credentials(args: argparse.Namespace) -> int:
    configure("warning")
    if args.api:
        api = api_for(args)
        try:
            result = api.call("POST", f"/profiles/{args.profile}/send-credentials")
        finally:
            api.close()
    else:
        from smtpgate.admin.operations import send_credentials as queue_it  # noqa: PLC0415
        from smtpgate.cli.backend import record_locally  # noqa: PLC0415
        from smtpgate.queue.store import QueueStore  # noqa: PLC0415

        config = applied_config(args)
        store = QueueStore(config.gateway.data_dir / "queue")
        try:
            result = queue_it(config, store, args.profile)
        finally:
            store.close()
        detail = f"{args.profile} → {result['to']}"  # as the API records it
        record_locally(config.gateway.data_dir, "credentials.send", detail)
    print(f"queued as {result['queue_id']} for {result['to']}")
    return 0


def verify(args: argparse.Namespace) -> int:
    if args.api:
        api = api_for(args)
        try:
            params = {"domain": args.domain} if args.domain else {}
            steps = api.call("POST", f"/connectors/{args.name}/verify", params=params)
        finally:
            api.close()
    else:
        steps = _verify_locally(args)
    for step in steps:
        print(f"{'ok  ' if step['ok'] else 'FAIL'} {step['name']}: {step['detail']}")
    return 0 if all(step["ok"] for step in steps) else 1


def _verify_locally(args: argparse.Namespace) -> list[dict[str, Any]]:
    from smtpgate.delivery.verify import verify_connector  # noqa: PLC0415
    from smtpgate.snapshot import Snapshot  # noqa: PLC0415

    config = applied_config(args)
    connector = next((c for c in config.send_connectors if c.name == args.name), None)
    fetching = next((c for c in config.receive_connectors.pop3 if c.name == args.name), None)
    if connector is None and fetching is not None:
        from smtpgate.delivery.pop3 import verify_pop3  # noqa: PLC0415

        found = asyncio.run(asyncio.to_thread(verify_pop3, config, fetching))
        return [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in found]
    if connector is None:
        raise NotFound(f"no send or POP3 connector named {args.name!r}")
    password = Snapshot.compile(config, certificates=False).smarthost_password(connector)
    steps = asyncio.run(verify_connector(config, connector, password, args.domain))
    return [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in steps]
