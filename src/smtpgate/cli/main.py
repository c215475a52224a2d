"""``smtpgate``: serve, check configuration, explain policy, credentials, sink.

Every command exits 0 on success, 1 when the thing it checked is wrong (a bad
configuration, a refused delivery), 2 on bad usage. Errors are printed as
sentences with the field path, never as tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from smtpgate import __version__
from smtpgate.cli import admin as admin_cli
from smtpgate.cli import queue as queue_cli
from smtpgate.config.load import notices, parse_config, read_document
from smtpgate.config.schema import GatewayConfig, parse_listen_address
from smtpgate.config.validate import warnings
from smtpgate.errors import AdminError, ConfigError
from smtpgate.observe.log import configure


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgate", description="A secure SMTP email gateway.")
    parser.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway in the foreground")
    serve.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument("--log-json", action="store_true", help="one JSON object per log line")

    config = commands.add_parser("config", help="configuration: check, draft, diff, apply")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("--config", type=Path, required=True)
    admin_cli.add_config_commands(config_commands)

    _add_policy(commands)
    _add_credentials(commands)
    queue_cli.add_parser(commands)
    admin_cli.add_object_commands(commands)
    _add_connector_verify(commands)
    admin_cli.add_admin_commands(commands)
    _add_certs(commands)
    _add_sink(commands)
    reload = commands.add_parser("reload", help="reload certificates in the running gateway")
    reload.add_argument("--config", type=Path, required=True)
    return parser


if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def _add_policy(commands: Commands) -> None:
    policy = commands.add_parser("policy", help="policy tools")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    explain = policy_commands.add_parser(
        "explain", help="show every decision the gateway would make for a client"
    )
    explain.add_argument("--config", type=Path, required=True)
    explain.add_argument("--client-ip", required=True)
    explain.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="a forward-confirmed host name of the client (no DNS lookup)",
    )
    explain.add_argument(
        "--lookup", action="store_true", help="find confirmed host names with DNS (gateway.dns)"
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
    explain.add_argument("--json", action="store_true")


def _add_credentials(commands: Commands) -> None:
    credentials = commands.add_parser("credentials", help="SMTP AUTH credentials")
    cred_commands = credentials.add_subparsers(dest="credentials_command", required=True)
    encrypt = cred_commands.add_parser(
        "encrypt", help="encrypt a password (read from standard input) for the configuration"
    )
    encrypt.add_argument("--config", type=Path, required=True)
    send = cred_commands.add_parser(
        "send", help="mail a profile's user names and passwords to gateway.admin_address"
    )
    send.add_argument("profile")
    send.add_argument("--config", type=Path, required=True)


def _add_certs(commands: Commands) -> None:
    certs = commands.add_parser("certs", help="certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    listing = certs_commands.add_parser("list", help="the configured certificates and expiry")
    listing.add_argument("--config", type=Path, required=True)
    listing.add_argument("--json", action="store_true")
    selfsigned = certs_commands.add_parser("selfsigned", help="make a first certificate")
    selfsigned.add_argument("name")
    selfsigned.add_argument("--host", required=True, help="the host name it is for")
    selfsigned.add_argument("--days", type=int, default=365)
    selfsigned.add_argument("--out", type=Path, default=Path("certs"), help="directory")


def _add_connector_verify(commands: Commands) -> None:
    connector = commands.choices["connector"]
    connector_commands = next(
        a for a in connector._actions if isinstance(a, argparse._SubParsersAction)
    )
    verify = connector_commands.add_parser(
        "verify", help="connect, EHLO, STARTTLS and AUTH as the connector would, step by step"
    )
    verify.add_argument("name")
    verify.add_argument("--config", type=Path, required=True)
    verify.add_argument("--domain", help="recipient domain to look up (direct delivery)")


def _add_sink(commands: Commands) -> None:
    sink = commands.add_parser("sink", help="run a recording SMTP server")
    sink.add_argument("--listen", default="127.0.0.1:2526", help="HOST:PORT (default %(default)s)")
    sink.add_argument("--dir", type=Path, default=Path("var/sink"), help="where messages go")
    sink.add_argument("--no-fsync", action="store_true", help="do not fsync stored messages")
    sink.add_argument("--rcpt-reply", help='refuse every RCPT, e.g. "550 5.1.1 no such user"')
    sink.add_argument(
        "--data-reply",
        action="append",
        default=[],
        help='answer the next message(s) with this reply, e.g. "451 4.3.0 try later"',
    )


def _fail(path: Path, exc: ConfigError) -> int:
    print(f"{path}: configuration is invalid:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


def _load(path: Path, *, announce: bool) -> GatewayConfig:
    document = read_document(path)
    config = parse_config(document)
    if announce:
        for notice in notices(document):
            print(f"notice: {notice}", file=sys.stderr)
        for warning in warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
    return config


def _applied(path: Path) -> GatewayConfig:
    """The configuration the gateway runs: the store's applied revision, or the
    file itself while the store is empty (before the first ``smtpgate serve``)."""
    config = _load(path, announce=False)
    from smtpgate.config.store import ConfigStore, store_path  # noqa: PLC0415

    if not store_path(config.gateway.data_dir).exists():
        return config
    store = ConfigStore.open(config.gateway.data_dir)
    try:
        revision = store.applied()
    finally:
        store.close()
    return parse_config(revision.document) if revision else config


def _config_check(path: Path) -> int:
    from smtpgate.app import load_certificates  # noqa: PLC0415

    config = _load(path, announce=True)
    load_certificates(config)  # key permissions, PINs, PEM syntax
    print(f"{path}: configuration is valid")
    return 0


def _serve(args: argparse.Namespace) -> int:
    configure(args.log_level, json=args.log_json)
    config = _load(args.config, announce=True)
    from smtpgate.admin.services import ConfigService  # noqa: PLC0415
    from smtpgate.app import run  # noqa: PLC0415 - keep the other commands light
    from smtpgate.config.store import ConfigStore  # noqa: PLC0415

    store = ConfigStore.open(config.gateway.data_dir)
    service = ConfigService(store, config.gateway.data_dir)
    revision, what = service.adopt_file(config, f"file:{args.config}")
    print(f"smtpgate: {what}", file=sys.stderr)
    try:
        run(parse_config(revision.document), store, revision.number)
    except OSError as exc:
        print(f"smtpgate: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _explain(args: argparse.Namespace) -> int:
    from smtpgate.dns import DnsResolver, confirmed_names  # noqa: PLC0415
    from smtpgate.policy.explain import Facts, explain  # noqa: PLC0415
    from smtpgate.policy.profile import ProfileIndex  # noqa: PLC0415

    config = _applied(args.config)
    names = list(args.hostname)
    if args.lookup:
        resolver = DnsResolver(config.gateway.dns)
        names += asyncio.run(confirmed_names(resolver, args.client_ip))
    users = {
        c.username: p.name for p in config.connection_profiles for c in p.smtp_auth.credentials
    }
    facts = Facts(
        args.client_ip,
        tuple(names),
        args.helo,
        args.sender,
        tuple(args.recipient),
        args.tls,
        args.auth,
        args.client_certificate,
    )
    result = explain(config, ProfileIndex(config), users, facts)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.as_text())
    return 0


def _encrypt(args: argparse.Namespace) -> int:
    from smtpgate.config.secret import encrypt, load_key  # noqa: PLC0415

    config = _load(args.config, announce=False)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("smtpgate credentials encrypt: empty password", file=sys.stderr)
        return 2
    print(encrypt(load_key(config.gateway.data_dir, create=True), password))
    return 0


def _send_credentials(args: argparse.Namespace) -> int:
    from smtpgate.admin.operations import send_credentials  # noqa: PLC0415
    from smtpgate.queue.store import QueueStore  # noqa: PLC0415

    configure("warning")
    config = _applied(args.config)
    store = QueueStore(config.gateway.data_dir / "queue")
    try:
        result = send_credentials(config, store, args.profile)
    finally:
        store.close()
    print(f"queued as {result['queue_id']} for {result['to']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from smtpgate.delivery.verify import verify_connector  # noqa: PLC0415
    from smtpgate.gateway import GatewayPolicy  # noqa: PLC0415

    config = _applied(args.config)
    policy = GatewayPolicy.build(config)
    connector = next((c for c in config.send_connectors if c.name == args.name), None)
    if connector is None:
        print(f"no send connector named {args.name!r}", file=sys.stderr)
        return 1
    steps = asyncio.run(
        verify_connector(config, connector, policy.smarthost_password(connector), args.domain)
    )
    for step in steps:
        print(f"{'ok  ' if step.ok else 'FAIL'} {step.name}: {step.detail}")
    return 0 if all(step.ok for step in steps) else 1


def _certs(args: argparse.Namespace) -> int:
    import datetime as dt  # noqa: PLC0415

    from smtpgate.tls import certificates  # noqa: PLC0415

    if args.certs_command == "selfsigned":
        cert_pem, key_pem = certificates.self_signed(args.host, args.days)
        args.out.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = args.out / f"{args.name}.pem", args.out / f"{args.name}.key"
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.chmod(0o600)
        key_path.write_bytes(key_pem)
        print(f"certificates:\n  - name: {args.name}\n    cert: {cert_path}\n    key: {key_path}")
        return 0
    from smtpgate.app import load_certificates  # noqa: PLC0415

    loaded = load_certificates(_applied(args.config))
    now = dt.datetime.now(dt.UTC)
    facts = [certificates.describe(item, now) for item in loaded.values()]
    if args.json:
        print(json.dumps(facts, indent=1))
    for fact in [] if args.json else facts:
        warning = (
            " EXPIRED"
            if fact["expired"]
            else (" expires within 30 days" if fact["expires_soon"] else "")
        )
        print(
            f"{fact['name']}: {fact['subject']}\n  SANs: {', '.join(fact['sans']) or '-'}"  # type: ignore[arg-type]
            f"\n  issuer: {fact['issuer']}\n  sha256: {fact['sha256']}\n  spki pin: "
            f"{fact['spki_pin']}\n  not after: {fact['not_after']}{warning}"
        )
    return 1 if any(f["expired"] for f in facts) else 0


def _reload(args: argparse.Namespace) -> int:
    config = _load(args.config, announce=False)
    pid_file = config.gateway.data_dir / "smtpgate.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"smtpgate reload: no running gateway found ({pid_file}: {exc})", file=sys.stderr)
        return 1
    print(f"asked gateway {pid} to reload its certificates")
    return 0


def _sink(args: argparse.Namespace) -> int:
    from smtpgate.sink import SinkBehaviour, parse_reply, run_sink  # noqa: PLC0415

    configure("warning")
    try:
        host, port = parse_listen_address(args.listen)
        behaviour = SinkBehaviour(
            directory=args.dir,
            fsync=not args.no_fsync,
            rcpt_reply=parse_reply(args.rcpt_reply) if args.rcpt_reply else None,
            data_replies=[parse_reply(text) for text in args.data_reply],
        )
    except ValueError as exc:
        print(f"smtpgate sink: {exc}", file=sys.stderr)
        return 2
    print(f"sink listening on {host}:{port}, writing to {args.dir}", flush=True)
    try:
        asyncio.run(run_sink(host, port, behaviour))
    except OSError as exc:
        print(f"smtpgate sink: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "config":
        if args.config_command == "check":
            return _config_check(args.config)
        return admin_cli.run_config(args)
    if args.command in ("profile", "listener", "certificate", "domain") or (
        args.command == "connector" and args.object_command != "verify"
    ):
        return admin_cli.run_object(args)
    if args.command == "admin":
        return admin_cli.run_admin(args)
    if args.command == "policy":
        return _explain(args)
    if args.command == "credentials":
        return _encrypt(args) if args.credentials_command == "encrypt" else _send_credentials(args)
    if args.command == "sink":
        return _sink(args)
    if args.command == "queue":
        return queue_cli.run(args, _load(args.config, announce=False))
    if args.command == "connector":  # verify
        return _verify(args)
    if args.command == "certs":
        return _certs(args)
    if args.command == "reload":
        return _reload(args)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        return _fail(getattr(args, "config", None) or Path("configuration"), exc)
    except AdminError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
