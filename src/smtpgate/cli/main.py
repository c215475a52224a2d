"""``smtpgate``: serve, check configuration, run a recording sink.

Every command exits 0 on success, 1 when the thing it checked is wrong (a bad
configuration), 2 on bad usage. Errors are printed as sentences with the
field path, never as tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from smtpgate import __version__
from smtpgate.config.load import load_config
from smtpgate.config.schema import parse_listen_address
from smtpgate.config.validate import warnings
from smtpgate.errors import ConfigError
from smtpgate.observe.log import configure


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgate", description="A secure SMTP email gateway.")
    parser.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway in the foreground")
    serve.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument("--log-json", action="store_true", help="one JSON object per log line")

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("--config", type=Path, required=True)

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
    return parser


def _config_check(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: configuration is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    for warning in warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: configuration is valid")
    return 0


def _serve(args: argparse.Namespace) -> int:
    configure(args.log_level, json=args.log_json)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: configuration is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    from smtpgate.app import run  # noqa: PLC0415 - keep `config check` light

    try:
        run(config)
    except OSError as exc:
        print(f"smtpgate: cannot start: {exc}", file=sys.stderr)
        return 1
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "config":
        return _config_check(args.config)
    if args.command == "sink":
        return _sink(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
