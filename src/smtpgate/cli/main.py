"""``smtpgate``: serve, check configuration, explain policy, credentials, sink.

Every command exits 0 on success, 1 when the thing it checked is wrong (a bad
configuration, a refused delivery), 2 on bad usage (an option's value is
checked where it is parsed, and the message names the option and the value).
Errors are printed as sentences with the field path, never as tracebacks.
Output cut short by its reader (``smtpgate config show | head``) ends
quietly with 141, as for a program killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from smtpgate import __version__
from smtpgate.cli import admin as admin_cli
from smtpgate.cli import cluster as cluster_cli
from smtpgate.cli import dkim as dkim_cli
from smtpgate.cli import quarantine as quarantine_cli
from smtpgate.cli import queue as queue_cli
from smtpgate.cli import tlsrpt as tlsrpt_cli
from smtpgate.cli import tools
from smtpgate.cli import trace as trace_cli
from smtpgate.cli import worker as worker_cli
from smtpgate.cli.args import (
    FileConfigError,
    NoDefaultConfigError,
    fill_default_config,
    listen_address,
    read_file,
)
from smtpgate.config.load import notices, parse_config
from smtpgate.config.schema import GatewayConfig, parse_listen_address
from smtpgate.config.validate import warnings
from smtpgate.errors import AdminError, ConfigError, QueueError
from smtpgate.files import restrict_umask
from smtpgate.observe.log import configure
from smtpgate.privileges import PrivilegeError, unknown

DEFAULT_HELP = "default $SMTPGATE_CONFIG, else /etc/smtpgate/gateway.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgate", description="A secure SMTP email gateway.")
    parser.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway in the foreground")
    serve.add_argument("--config", type=Path, help=f"YAML configuration file ({DEFAULT_HELP})")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument("--log-json", action="store_true", help="one JSON object per log line")

    config = commands.add_parser("config", help="configuration: check, draft, diff, apply")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("--config", type=Path, help=DEFAULT_HELP)
    admin_cli.add_config_commands(config_commands)

    tools.add_policy(commands)
    tools.add_credentials(commands)
    queue_cli.add_parser(commands)
    quarantine_cli.add_parser(commands)
    admin_cli.add_object_commands(commands)
    tools.add_connector_verify(commands)
    admin_cli.add_admin_commands(commands)
    cluster_cli.add_parser(commands)
    dkim_cli.add_parser(commands)
    trace_cli.add_parser(commands)
    tlsrpt_cli.add_parser(commands)
    _add_certs(commands)
    _add_sink(commands)
    worker_cli.add_parser(commands)
    reload = commands.add_parser("reload", help="reload certificates in the running gateway")
    reload.add_argument("--config", type=Path, help=DEFAULT_HELP)
    return parser


if TYPE_CHECKING:
    from smtpgate.config.document import Document
    from smtpgate.config.store import ConfigStore

    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def _add_certs(commands: Commands) -> None:
    certs = commands.add_parser("certs", help="certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    listing = certs_commands.add_parser("list", help="the configured certificates and expiry")
    listing.add_argument("--config", type=Path, help=DEFAULT_HELP)
    listing.add_argument("--json", action="store_true")
    selfsigned = certs_commands.add_parser("selfsigned", help="make a first certificate")
    selfsigned.add_argument("name")
    selfsigned.add_argument("--host", required=True, help="the host name it is for")
    selfsigned.add_argument("--days", type=int, default=365)
    selfsigned.add_argument("--out", type=Path, default=Path("certs"), help="directory")


def _add_sink(commands: Commands) -> None:
    sink = commands.add_parser("sink", help="run a recording SMTP server")
    sink.add_argument(
        "--listen",
        type=listen_address,
        default="127.0.0.1:2526",
        help="HOST:PORT (default %(default)s)",
    )
    sink.add_argument("--dir", type=Path, default=Path("var/sink"), help="where messages go")
    sink.add_argument("--no-fsync", action="store_true", help="do not fsync stored messages")
    sink.add_argument("--rcpt-reply", help='refuse every RCPT, e.g. "550 5.1.1 no such user"')
    sink.add_argument(
        "--data-reply",
        action="append",
        default=[],
        help='answer the next message(s) with this reply, e.g. "451 4.3.0 try later"',
    )


def _fail(exc: ConfigError) -> int:
    """Every problem with its field path; the file is named only when it is to blame."""
    if isinstance(exc, FileConfigError):
        print(f"{exc.path}: configuration is invalid:", file=sys.stderr)
    else:
        print("smtpgate: invalid configuration:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


def _load(path: Path, *, announce: bool) -> GatewayConfig:
    document = read_file(path)
    try:
        config = parse_config(document)
    except ConfigError as exc:
        raise FileConfigError(path, exc) from None
    if announce:
        for notice in notices(document):
            print(f"notice: {notice}", file=sys.stderr)
        for warning in warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
    return config


def _check_certificates(path: Path, config: GatewayConfig, *, refuse_expired: bool) -> None:
    """Open every certificate (PEM syntax, key permissions, PINs, key pairs, expiry)
    and print the warnings (expiring within 30 days)."""
    from smtpgate.tls.certificates import check_configured  # noqa: PLC0415

    try:
        found = check_configured(config, refuse_expired=refuse_expired)
    except ConfigError as exc:
        raise FileConfigError(path, exc) from None
    for warning in found:
        print(f"warning: {warning}", file=sys.stderr)


def _config_check(path: Path) -> int:
    config = _load(path, announce=True)
    _check_certificates(path, config, refuse_expired=True)
    for warning in unknown(config.gateway.user, config.gateway.group):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: configuration is valid")
    return 0


def _serve(args: argparse.Namespace) -> int:
    configure(args.log_level, json=args.log_json)
    config = _load(args.config, announce=True)
    # before the file becomes a revision; an expired certificate only warns here,
    # so that a restart keeps mail flowing
    _check_certificates(args.config, config, refuse_expired=False)
    from smtpgate.app import run  # noqa: PLC0415 - keep the other commands light
    from smtpgate.cli.serving import privileges_for  # noqa: PLC0415

    try:
        drop = privileges_for(config)
    except PrivilegeError as exc:
        print(f"smtpgate: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        store, number, document = _starting_revision(args.config, config)
    except LookupError as exc:
        print(f"smtpgate: cannot start: {exc}", file=sys.stderr)
        return 1
    from smtpgate.supervisor import run as supervise  # noqa: PLC0415
    from smtpgate.supervisor import worker_count  # noqa: PLC0415

    starting = parse_config(document)
    try:
        if worker_count(starting) > 1:
            supervise(starting, store, number, drop=drop)
        else:
            run(starting, store, number, opener=lambda: _open_store(config), drop=drop)
    except OSError as exc:
        print(f"smtpgate: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _open_store(config: GatewayConfig) -> ConfigStore:
    from smtpgate.config.store import ConfigStore  # noqa: PLC0415

    return ConfigStore.open_configured(config.gateway)


def _starting_revision(
    path: Path, config: GatewayConfig
) -> tuple[ConfigStore | None, int | None, Document]:
    """The store and the revision to start with: the file adopted into the store;
    or, when the store cannot be reached, the revision this node ran last (it
    catches up once the store answers). LookupError when there is neither."""
    from smtpgate.admin import nodes  # noqa: PLC0415
    from smtpgate.admin.keys import check_cluster_key  # noqa: PLC0415
    from smtpgate.admin.services import ConfigService  # noqa: PLC0415
    from smtpgate.config.document import local_part, merge, shared_part, to_document  # noqa: PLC0415

    try:
        store = _open_store(config)
        check_cluster_key(store, config.gateway.data_dir)  # a peer with another key: refuse
        revision, what = ConfigService(store, config.gateway.data_dir).adopt_file(
            config, f"file:{path}"
        )
    except ConfigError:
        raise
    except Exception as exc:  # any failure of the store: serve from the cache
        cached = nodes.cached_applied(config.gateway.data_dir)
        if cached is None:
            raise LookupError(
                f"the configuration store is unreachable ({exc}) and this node has "
                "no revision of its own to start with"
            ) from None
        print(
            f"smtpgate: the configuration store is unreachable ({exc}); running "
            f"revision {cached[0]}, the last this node ran, until it answers",
            file=sys.stderr,
        )
        local = local_part(to_document(config))  # the file's, which may be newer
        return None, cached[0], merge(shared_part(cached[1]), local)
    print(f"smtpgate: {what}", file=sys.stderr)
    return store, revision.number, revision.document


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
    from smtpgate.tls.certificates import load_configured  # noqa: PLC0415

    loaded = load_configured(tools.applied_config(args))
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
    try:
        asyncio.run(run_sink(host, port, behaviour))
    except OSError as exc:
        print(f"smtpgate sink: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "config":
        if args.config_command == "check":
            return _config_check(args.config)
        return admin_cli.run_config(args)
    if command == "credentials":
        if args.credentials_command == "encrypt":
            return tools.encrypt(args)
        return tools.send_credentials(args)
    if command == "connector" and args.object_command == "verify":
        return tools.verify(args)
    if command == "connector" and args.object_command == "status":
        return tools.connector_status(args)
    if command in ("profile", "connector", "listener", "certificate", "domain"):
        return admin_cli.run_object(args)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _serve,
        "admin": admin_cli.run_admin,
        "policy": tools.explain,
        "queue": queue_cli.run,
        "quarantine": quarantine_cli.run,
        "cluster": cluster_cli.run,
        "dkim": dkim_cli.run,
        "trace": trace_cli.run,
        "tlsrpt": tlsrpt_cli.run,
        "certs": _certs,
        "reload": _reload,
        "sink": _sink,
        "worker": worker_cli.run,
    }
    return handlers[command](args)


SIGPIPE_EXIT = 128 + signal.SIGPIPE


@contextmanager
def _reader_may_leave() -> Iterator[None]:
    """The standard recipe for a reader that stops early (``| head``): no
    traceback, and no second error when Python flushes stdout at exit."""
    try:
        try:
            yield
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(SIGPIPE_EXIT) from None


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        fill_default_config(args)
    except NoDefaultConfigError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 1
    try:
        return _dispatch(args)
    except ConfigError as exc:
        return _fail(exc)
    except AdminError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 1
    except QueueError as exc:  # the queue database failed: say so, no traceback
        print(f"smtpgate: the queue cannot be read or written: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    restrict_umask()  # whatever we create (queue, store, keys, WAL files) is ours alone
    with _reader_may_leave():
        return _run(argv)


if __name__ == "__main__":
    sys.exit(main())
