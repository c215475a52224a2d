"""Throughput to a slow, crowded destination, with and without per-destination shaping.

The destination is tests/slowsink.py on loopback: it takes ``--max-connections``
connections at once (more are greeted with ``421 4.7.0 Too many connections``)
and answers each end of data after ``--delay`` seconds. A gateway (in this
process, as the tests run it) relays ``--messages`` separate messages to it
through one smarthost connector, in four set-ups:

* ``no shaping``: the default concurrency of 20 and the 421 feedback turned off
  (what the gateway did before shaping: every attempt beyond the server's limit
  is refused and deferred to a retry);
* ``feedback``: the defaults (20, lowered on the first 421);
* ``rule``: ``queue.shaping`` with the server's own limit as ``concurrency``;
* ``rule, 1/conn``: the same with ``messages_per_connection`` 1 (a new
  connection for every message: what the connection cache saves).

For each: the time until every message has arrived, the messages per second,
the 421 refusals the server gave and the deferrals (attempts that did not
deliver). Retries come after ``--retry`` seconds (the tests' short setting; the
default ``queue.retry.first`` is 5 minutes, so in production each refused
attempt costs far more than here).

Usage: ``python benchmarks/shaping.py [--messages N] [--delay S]
[--max-connections N] [--retry S]``
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import base_config, merge
from tests.slowsink import SlowSink

from smtpgate.app import build_gateway
from smtpgate.config import parse_config
from smtpgate.observe.log import configure


def burst(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for n in range(count):
            client.sendmail(
                "bob@example.org", ["alice@example.com"], f"Subject: m{n}\r\n\r\nbody\r\n".encode()
            )


async def run(name: str, args: argparse.Namespace, queue: dict[str, Any], *, feedback: bool) -> str:
    server = SlowSink(args.delay, args.max_connections)
    await server.start()
    with tempfile.TemporaryDirectory() as directory:
        document = merge(
            base_config(Path(directory), server.port),
            {
                "spoof_detection": False,
                "queue": {"retry": {"first": args.retry, "max_backoff": args.retry}, **queue},
            },
        )
        gateway = await build_gateway(parse_config(document))
        await gateway.start()
        deferred = 0
        original = gateway.manager._outcome

        def counting(message: Any, r: Any, code: Any, *rest: Any, **kw: Any) -> None:
            nonlocal deferred
            deferred += code is None or code >= 400
            original(message, r, code, *rest, **kw)

        gateway.manager._outcome = counting  # type: ignore[method-assign]
        patch = mock.patch("smtpgate.queue.shaping.too_many_connections", return_value=False)
        if not feedback:
            patch.start()
        try:
            started = time.monotonic()
            await asyncio.to_thread(burst, gateway.server.bound_ports()["mx"], args.messages)
            while len(server.subjects) < args.messages:  # noqa: ASYNC110 - the server's count
                await asyncio.sleep(0.02)
            took = time.monotonic() - started
        finally:
            if not feedback:
                patch.stop()
            await gateway.stop(1)
            await server.stop()
    rate = args.messages / took
    return (
        f"{name:<16} {took:8.2f} s {rate:8.1f} msg/s {server.refused:8d} {deferred:9d}"
        f" {server.most_open:6d}"
    )


async def main(args: argparse.Namespace) -> None:
    configure("error")
    limit = args.max_connections
    rule = {"destination": "127.0.0.1:*", "concurrency": limit}
    setups: list[tuple[str, dict[str, Any], bool]] = [
        ("no shaping", {}, False),
        ("feedback", {}, True),
        ("rule", {"shaping": [rule]}, True),
        ("rule, 1/conn", {"shaping": [{**rule, "messages_per_connection": 1}]}, True),
    ]
    print(
        f"{args.messages} messages to one destination that takes {limit} connections "
        f"and {args.delay} s per message; retries after {args.retry} s"
    )
    print(f"{'set-up':<16} {'time':>10} {'rate':>14} {'421s':>8} {'deferred':>9} {'conns':>6}")
    for name, queue, feedback in setups:
        print(await run(name, args, {"connection_cache_time": 5, **queue}, feedback=feedback))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--max-connections", type=int, default=5)
    parser.add_argument("--retry", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
