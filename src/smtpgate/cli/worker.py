"""``smtpgate worker``: one worker process of ``smtpgate serve``, started by it.

Not for people: ``serve`` (``smtpgate.supervisor``) starts it with the
listening sockets it bound (``--fds``), the shared connection counts
(``--connections``) and, on stdin, the configuration to start with (JSON:
``revision`` and the merged ``document``, secrets as their ``enc:v1:``
tokens). The worker leaves when its parent does (``PR_SET_PDEATHSIG``), so a
killed supervisor never leaves workers holding the ports.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from smtpgate.observe.log import configure

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

PR_SET_PDEATHSIG = 1


def add_parser(commands: Commands) -> None:
    worker = commands.add_parser("worker", help="a worker process of `serve` (started by it)")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    worker.add_argument("--fds", required=True, help="listener=fd,fd;listener=fd")
    worker.add_argument("--connections", type=Path, required=True)
    worker.add_argument("--parent", type=int, required=True)
    worker.add_argument("--cpu", type=int, default=None, help="run on this CPU only")
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    worker.add_argument("--log-json", action="store_true")


def parse_fds(text: str) -> dict[str, list[int]]:
    """``mx=5,6;submission=7`` → ``{"mx": [5, 6], "submission": [7]}``."""
    found: dict[str, list[int]] = {}
    for part in filter(None, text.split(";")):
        name, _eq, numbers = part.rpartition("=")
        found[name] = [int(n) for n in numbers.split(",") if n]
    return found


def _leave_with_parent(parent: int) -> None:
    """Die with the supervisor: a SIGKILL to it is a crash of the whole gateway."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def run(args: argparse.Namespace) -> int:
    _leave_with_parent(args.parent)
    if args.cpu is not None:  # before any thread starts: they inherit it
        try:
            os.sched_setaffinity(0, {args.cpu})
        except OSError as exc:  # an optimisation: the worker runs unpinned
            print(
                f"smtpgate worker {args.index}: not pinned to CPU {args.cpu}: {exc}",
                file=sys.stderr,
            )
    configure(args.log_level, json=args.log_json)
    from smtpgate.app import WorkerRole, run_worker  # noqa: PLC0415
    from smtpgate.config.load import parse_config  # noqa: PLC0415
    from smtpgate.config.store import ConfigStore  # noqa: PLC0415

    started = json.loads(sys.stdin.buffer.read())
    config = parse_config(started["document"])
    sockets = {
        name: [socket.socket(fileno=fd) for fd in numbers]
        for name, numbers in parse_fds(args.fds).items()
    }
    role = WorkerRole(args.index, args.count, sockets, args.connections, args.parent)

    def opener() -> ConfigStore:
        return ConfigStore.open_configured(config.gateway)

    try:
        store: ConfigStore | None = opener()
    except Exception as exc:  # the store is down: the worker follows it once it answers
        print(f"smtpgate worker {args.index}: store unreachable: {exc!r}", file=sys.stderr)
        store = None
    try:
        run_worker(config, started["revision"], role, store, opener)
    except OSError as exc:  # the supervisor says which worker; this says why
        print(f"smtpgate worker {args.index}: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
