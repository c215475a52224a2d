"""Bounded cost: what one message, recipient, byte and idle connection costs smtpgate.

One ``smtpgate serve`` (``gateway.workers: 1`` when the setting exists; no
REST API) relays everything from loopback to Postfix's smtp-sink, and this
prints four tables:

1. memory per idle connection (measured first, after 50 warm-up messages):
   1000 plain sockets that read the 220 greeting and wait;
   (RSS after - RSS before) / 1000, RSS summed over the tree;
2. recipients per message (``smtp-source -r N``: N distinct addresses,
   1rcpt@…, 2rcpt@…): messages/s, recipients/s, and the gateway's CPU
   (user + system over its process tree, from /proc/<pid>/stat) per message
   and per recipient;
3. message size (``smtp-source -l``) from 1 KB to 10 MB: messages/s, MB/s,
   CPU ms per message and per MB; once the fixed per-message cost is small
   (from about 1 MB on) CPU ms/MB stays flat if the cost grows linearly;
4. one 50 MB message, last: peak RSS (VmHWM summed over the tree; reset to
   the current RSS just before, by writing 5 to /proc/<pid>/clear_refs, so
   that the peaks of the 10 MB runs do not hide it) and whether smtp-sink
   counted it.

Rates are from the first connection until smtp-sink has counted every
message; the load reuses connections (``-d``) so that the connection setup
does not blur the per-message cost. Needs Debian's postfix (smtp-source,
smtp-sink) and the project installed.

Usage: ``python benchmarks/costs.py [--quick] [--sessions N]``
"""

from __future__ import annotations

import argparse
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from relay import (
    Gateway,
    Sink,
    start_smtpgate,
    stop_smtpgate,
    tree_cpu,
    tree_kib,
    tree_pids,
    workers_supported,
)

MB = 1_000_000
# (recipients, messages, messages with --quick)
RECIPIENTS = [(1, 1000, 200), (10, 1000, 200), (100, 300, 60)]
# (size, messages, messages with --quick)
SIZES = [
    (1_000, 1000, 200),
    (10_000, 1000, 200),
    (100_000, 300, 60),
    (1_000_000, 50, 10),
    (10_000_000, 10, 3),
]
IDLE = 1000
BIG = 50_000_000


@dataclass
class Load:
    messages: int
    size: int
    sessions: int
    recipients: int = 1


def send(gateway: Gateway, sink: Sink, load: Load) -> tuple[float, float]:
    """Relay ``load``: (seconds, gateway CPU seconds) until the sink has counted it all."""
    argv = [
        "smtp-source",
        "-d",
        "-l",
        str(load.size),
        "-m",
        str(load.messages),
        "-s",
        str(min(load.sessions, load.messages)),
        "-r",
        str(load.recipients),
        "-f",
        "sender@bench.example",
        "-t",
        "rcpt@far.example",
        f"127.0.0.1:{gateway.port}",
    ]
    before, cpu = sink.count, tree_cpu(gateway.process.pid)
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=900)
    if not sink.wait_until(before + load.messages, 900):
        raise RuntimeError(f"only {sink.count - before} of {load.messages} arrived")
    return time.perf_counter() - start, tree_cpu(gateway.process.pid) - cpu


def recipients_table(gateway: Gateway, sink: Sink, args: argparse.Namespace) -> None:
    print("\n## Cost per recipient (1000-byte messages)\n")
    print("| recipients/msg | messages | msg/s | rcpt/s | CPU ms/msg | CPU µs/rcpt |")
    print("|---:|---:|---:|---:|---:|---:|")
    for recipients, full, quick in RECIPIENTS:
        messages = quick if args.quick else full
        elapsed, cpu = send(gateway, sink, Load(messages, 1000, args.sessions, recipients))
        print(
            f"| {recipients} | {messages} | {messages / elapsed:.0f} "
            f"| {messages * recipients / elapsed:.0f} | {cpu / messages * 1e3:.2f} "
            f"| {cpu / (messages * recipients) * 1e6:.0f} |",
            flush=True,
        )


def human(size: int) -> str:
    return f"{size // MB} MB" if size >= MB else f"{size // 1000} KB"


def sizes_table(gateway: Gateway, sink: Sink, args: argparse.Namespace) -> None:
    print("\n## Cost per byte (1 recipient)\n")
    print("| size | messages | msg/s | MB/s | CPU ms/msg | CPU ms/MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, full, quick in SIZES:
        messages = quick if args.quick else full
        elapsed, cpu = send(gateway, sink, Load(messages, size, args.sessions))
        print(
            f"| {human(size)} | {messages} | {messages / elapsed:.1f} "
            f"| {messages * size / MB / elapsed:.1f} | {cpu / messages * 1e3:.2f} "
            f"| {cpu / (messages * size / MB) * 1e3:.1f} |",
            flush=True,
        )


def idle_table(gateway: Gateway) -> None:
    pid = gateway.process.pid
    time.sleep(1)
    before = tree_kib(pid, "VmRSS")
    sockets = []
    refused = 0
    try:
        for _ in range(IDLE):
            conn = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            sockets.append(conn)
            if not conn.recv(200).startswith(b"220"):
                refused += 1
        time.sleep(1)
        after = tree_kib(pid, "VmRSS")
    finally:
        for conn in sockets:
            conn.close()
    print("\n## Memory per idle connection (greeting read, then waiting)\n")
    print("| connections | refused | RSS before | RSS after | per connection |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {IDLE} | {refused} | {before / 1024:.1f} MiB | {after / 1024:.1f} MiB "
        f"| {(after - before) / IDLE:.1f} KiB |",
        flush=True,
    )


def reset_peaks(root: int) -> bool:
    """Set VmHWM back to the current RSS in the tree of ``root`` (``5 > clear_refs``)."""
    try:
        for pid in tree_pids(root):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def big_table(gateway: Gateway, sink: Sink) -> None:
    pid = gateway.process.pid
    earlier = tree_kib(pid)  # the peak of everything above
    reset = reset_peaks(pid)
    rss, before, count = tree_kib(pid, "VmRSS"), tree_kib(pid), sink.count
    elapsed, _ = send(gateway, sink, Load(1, BIG, 1))
    after = tree_kib(pid)
    arrived = sink.count - count
    print(f"\n## One {BIG // MB} MB message (after the tables above as warm-up)\n")
    print(
        "peak RSS = VmHWM summed over the tree, "
        + (
            "reset to the RSS before the message (clear_refs)"
            if reset
            else "NOT reset: it includes the peaks of the runs above"
        )
    )
    print(
        "\n| peak RSS of the runs above | RSS before | peak RSS with the message | growth "
        "| arrived at smtp-sink | seconds |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {earlier / 1024:.1f} MiB | {rss / 1024:.1f} MiB | {after / 1024:.1f} MiB "
        f"| {(after - min(before, rss)) / 1024:.1f} MiB "
        f"| {'yes' if arrived == 1 else f'no ({arrived})'} | {elapsed:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a fifth of the messages")
    parser.add_argument("--sessions", type=int, default=10)
    args = parser.parse_args()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * IDLE:  # our sockets, and the gateway's (it inherits the limit)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * IDLE), hard))
    supported = workers_supported()
    print(
        f"one smtpgate serve ({'gateway.workers: 1' if supported else 'no gateway.workers yet'}, "
        f"no REST API) → smtp-sink; smtp-source -d, {args.sessions} sessions"
        + (", --quick" if args.quick else "")
    )
    started = time.perf_counter()
    sink = Sink()
    try:
        with tempfile.TemporaryDirectory() as directory:
            gateway = start_smtpgate(
                Path(directory),
                sink,
                workers=1 if supported else None,
                limits={
                    "max_connections": 4 * IDLE,
                    "max_connections_per_ip": 4 * IDLE,
                    "max_message_size": BIG + 10 * MB,
                },
                api=False,
            )
            try:
                send(gateway, sink, Load(50, 1000, args.sessions))  # warm-up
                idle_table(gateway)  # first: before the loads below grow the heap
                recipients_table(gateway, sink, args)
                sizes_table(gateway, sink, args)
                big_table(gateway, sink)
                processes = len(tree_pids(gateway.process.pid))
                print(f"\n(the gateway's process tree had {processes} process(es))")
            finally:
                stop_smtpgate(gateway)
    finally:
        sink.stop()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
