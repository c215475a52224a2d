"""``smtpgate tlsrpt``: TLS reports (RFC 8460).

``send [--day YYYY-MM-DD]`` sends the aggregate reports of a day (default:
yesterday, UTC) that the gateway has not sent yet; ``show FILE...`` prints a
readable summary of TLS reports received (``.json``, ``.json.gz`` or the
whole ``.eml`` message), ``--json`` for the parsed report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from smtpgate.cli.admin import api_for, where_options
from smtpgate.errors import AdminError

MAX_FILE = 16 * 1024 * 1024


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("tlsrpt", help="TLS reports (RFC 8460): send, read")
    actions = parser.add_subparsers(dest="tlsrpt_command", required=True)
    send = actions.add_parser("send", help="send a day's aggregate reports not yet sent")
    send.add_argument("--day", help="YYYY-MM-DD (UTC); default: yesterday")
    where_options(send, json_output=False)
    show = actions.add_parser("show", help="summarise TLS reports received")
    show.add_argument("files", nargs="+", metavar="FILE")
    where_options(show)


def run(args: argparse.Namespace) -> int:
    if args.tlsrpt_command == "show":
        return _show(args)
    from smtpgate.admin.tlsreports import send_day  # noqa: PLC0415
    from smtpgate.cli.tools import applied_config  # noqa: PLC0415
    from smtpgate.delivery.tlsrpt import utc_day  # noqa: PLC0415

    day = args.day or utc_day(time.time() - 86_400)
    if args.api:
        api = api_for(args)
        try:
            done = api.call("POST", "/tlsrpt/send", params={"day": day})["sent"]
        finally:
            api.close()
    else:
        done = asyncio.run(send_day(applied_config(args), day))
    for line in done or [f"{day}: nothing to send"]:
        print(line)
    return 0


def _read(data: bytes, args: argparse.Namespace) -> dict[str, Any]:
    from smtpgate.admin.tlsreports import summary  # noqa: PLC0415

    if not args.api:
        return summary(data)
    api = api_for(args)
    try:
        result: dict[str, Any] = api.call("POST", "/tlsrpt/summary", content=data)
    finally:
        api.close()
    return result


def _file(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise ValueError("larger than 16 MiB")
    return data


def _show(args: argparse.Namespace) -> int:
    found, failed = [], 0
    for name in args.files:
        try:
            found.append(_read(_file(Path(name)), args))
        except (OSError, ValueError, AdminError) as exc:
            print(f"smtpgate tlsrpt show: {name}: {exc}", file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps([f["report"] for f in found], indent=2))
    else:
        print("\n\n".join("\n".join(f["summary"]) for f in found))
    return 1 if failed else 0
