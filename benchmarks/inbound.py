"""Inbound throughput: accepted messages per second over loopback.

Each server runs in its own process; Postfix's smtp-source is the load
(one message per connection, then with connection reuse, ``-d``). In the
same run, side by side:

* smtpgate's engine (sessions, protocol core, spool file per message; the
  handler answers 250 without relaying, so only the inbound side is timed),
* an aiosmtpd sink whose handler answers 250 (bodies stay in memory),
* Postfix's smtp-sink (C, the reference ceiling),

each on plain asyncio and on uvloop. Usage: ``python benchmarks/inbound.py
[--messages N] [--sessions N] [--size BYTES]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import free_port, smtp_source, wait_for

SERVERS = ("smtpgate", "aiosmtpd")
LOOPS = ("asyncio", "uvloop")


# -- servers (run in child processes) ------------------------------------------


async def serve_smtpgate(port: int, spool: Path) -> None:
    from smtpgate.inbound.contract import SessionHandler, SessionInfo, SessionSettings
    from smtpgate.inbound.server import InboundServer, ListenerSpec, ServerLimits
    from smtpgate.model.envelope import Envelope
    from smtpgate.observe.log import configure
    from smtpgate.proto import events as ev
    from smtpgate.proto.replies import Reply
    from smtpgate.proto.state import SessionLimits
    from smtpgate.spool import SpooledBody

    configure("warning")
    ok = Reply.of(250, "2.0.0", "Ok: accepted")

    class Accept:
        async def on_connect(self, info: SessionInfo) -> Reply | None:
            return None

        def on_command(self, info: SessionInfo, event: ev.Event) -> Reply | None:
            return None

        async def on_auth(self, info: SessionInfo, username: str, password: str) -> Reply:
            return Reply.of(535, "5.7.8", "no")

        async def on_message(
            self, info: SessionInfo, envelope: Envelope, body: SpooledBody
        ) -> Reply:
            return ok

    settings = SessionSettings(SessionLimits(), 300, 180, 60, spool, None, False)
    spec = ListenerSpec("bench", "127.0.0.1", port, None, settings)

    def factory() -> SessionHandler:
        return Accept()

    server = InboundServer([spec], factory, ServerLimits(10_000, 10_000, 60), "bench.test")
    await server.start()
    await asyncio.Event().wait()


async def serve_aiosmtpd(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    class Accept:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:  # noqa: N802
            return "250 2.0.0 Ok: accepted"

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Accept(), hostname="bench.test", data_size_limit=10_240_000),
        "127.0.0.1",
        port,
    )
    async with server:
        await asyncio.Event().wait()


def child(kind: str, loop: str, port: int, spool: Path) -> None:
    coroutine = serve_smtpgate(port, spool) if kind == "smtpgate" else serve_aiosmtpd(port)
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coroutine)
    else:
        asyncio.run(coroutine)


# -- load ----------------------------------------------------------------------


def load(port: int, args: argparse.Namespace, reuse: bool) -> float:
    """Messages per second that smtp-source got accepted."""
    argv = smtp_source(port, args, "rcpt@bench.example", reuse=reuse)
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {result.stderr.strip()[-300:]}")
    return args.messages / elapsed


def measure(start_server: list[str], port: int, args: argparse.Namespace) -> tuple[float, float]:
    process = subprocess.Popen(start_server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(port)
        load(port, argparse.Namespace(**{**vars(args), "messages": 200}), True)  # warm-up
        return load(port, args, False), load(port, args, True)
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "LOOP", "PORT"))
    args = parser.parse_args()
    if args.child:
        kind, loop, port = args.child
        child(kind, loop, int(port), Path(os.environ["BENCH_SPOOL"]))
        return
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install postfix")
    spool = Path(tempfile.mkdtemp(prefix="smtpgate-bench-"))
    os.environ["BENCH_SPOOL"] = str(spool)
    print(
        f"{args.messages} messages of {args.size} bytes, {args.sessions} parallel sessions, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'server':<26}{'1 msg/conn':>14}{'reuse (-d)':>14}")
    results: dict[str, tuple[float, float]] = {}
    for loop in LOOPS:
        for kind in SERVERS:
            port = free_port()
            argv = [sys.executable, __file__, "--child", kind, loop, str(port)]
            results[f"{kind} ({loop})"] = measure(argv, port, args)
            name = f"{kind} ({loop})"
            print(f"{name:<26}{results[name][0]:>10.0f}/s{results[name][1]:>10.0f}/s", flush=True)
    port = free_port()
    as_user = ["-u", "postfix"] if os.geteuid() == 0 else []  # smtp-sink refuses root
    sink_argv = ["smtp-sink", *as_user, "-c", f"127.0.0.1:{port}", "1000"]
    results["postfix smtp-sink"] = measure(sink_argv, port, args)
    print(
        f"{'postfix smtp-sink (C)':<26}{results['postfix smtp-sink'][0]:>10.0f}/s"
        f"{results['postfix smtp-sink'][1]:>10.0f}/s"
    )
    for loop in LOOPS:
        ours, theirs = results[f"smtpgate ({loop})"], results[f"aiosmtpd ({loop})"]
        print(
            f"smtpgate / aiosmtpd on {loop}: {ours[0] / theirs[0]:.2f}x per connection, "
            f"{ours[1] / theirs[1]:.2f}x with reuse"
        )
    shutil.rmtree(spool, ignore_errors=True)


if __name__ == "__main__":
    main()
