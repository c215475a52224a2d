"""Helpers shared by the benchmarks: free ports and waiting for a server."""

from __future__ import annotations

import argparse
import socket
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(port: int, attempts: int = 200) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``."""
    for _ in range(attempts):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise RuntimeError(f"nothing listens on port {port}")


def smtp_source(port: int, args: argparse.Namespace, recipient: str, *, reuse: bool) -> list[str]:
    """The smtp-source command line: ``args`` has messages, sessions and size."""
    argv = [
        "smtp-source",
        "-c",
        "-l",
        str(args.size),
        "-m",
        str(args.messages),
        "-s",
        str(args.sessions),
        "-f",
        "sender@bench.example",
        "-t",
        recipient,
    ]
    return [*argv, *(["-d"] if reuse else []), f"127.0.0.1:{port}"]
