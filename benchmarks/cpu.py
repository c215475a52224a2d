"""Where the CPU goes per relayed message: smtpgate against Postfix, same run.

``relay.py`` says how many messages per second each relay moves; this says
what each message costs and who pays: the relay (its processes and the
kernel work they cause, such as loopback TCP), Postfix's smtp-source (the
load) and smtp-sink (the next hop), and how much of the machine stayed idle.
A relay whose rate is limited by the CPU leaves little idle; the figure that
decides how far a relay can go on a given machine is its CPU per message.

Method: the whole machine's busy and idle time from ``/proc/stat``, the load
generator's from ``RUSAGE_CHILDREN`` (it is our child), the sink's and the
gateway's from ``/proc/<pid>/stat`` over their process trees; "relay +
kernel" is the busy time minus load and sink. With ``--threads`` each
smtpgate thread's share is printed too (the event loop, the queue's thread,
the tracking writer, ...).

Needs root, Debian's postfix and smtp-source/smtp-sink, and the project
installed. Usage: ``python benchmarks/cpu.py [--messages N] [--size B]
[--workers-list 1,2] [--threads] [--pinned]``
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import free_port, smtp_source
from relay import (
    Sink,
    integers,
    start_smtpgate,
    stop_smtpgate,
    tree_cpu,
    tree_pids,
    variants,
    warm_up,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.postfix import Postfix, instance_directory

TICK = os.sysconf("SC_CLK_TCK")


def machine() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = values[:7]
    return (user + nice + system + irq + softirq) / TICK, (idle + iowait) / TICK


def children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def threads(root: int) -> dict[tuple[int, int], tuple[str, float, float]]:
    """(pid, tid) → (name, user, system) seconds, over the process tree of ``root``."""
    found = {}
    for pid in tree_pids(root):
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            found[(pid, int(task.name))] = (name, int(fields[11]) / TICK, int(fields[12]) / TICK)
    return found


@dataclass
class Costs:
    rate: float
    busy: float  # µs per message, the whole machine
    idle: float
    load: float  # smtp-source
    sink: float
    relay: float  # busy - load - sink: the relay and the kernel work it causes
    measured: float | None  # the gateway's process tree alone (smtpgate only)


def measure(
    port: int, sink: Sink, args: argparse.Namespace, reuse: bool, root: int | None
) -> Costs:
    load = argparse.Namespace(messages=args.messages, size=args.size, sessions=args.sessions)
    busy0, idle0 = machine()
    sink0, load0 = tree_cpu(sink.process.pid), children()
    own0 = tree_cpu(root) if root else 0.0
    before, started = sink.count, time.perf_counter()
    command = smtp_source(port, load, "rcpt@far.example", reuse=reuse)
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    if not sink.wait_until(before + args.messages, 900):
        raise RuntimeError(f"only {sink.count - before} of {args.messages} arrived")
    wall = time.perf_counter() - started
    busy1, idle1 = machine()
    per = 1e6 / args.messages
    busy, load_cpu = (busy1 - busy0) * per, (children() - load0) * per
    sink_cpu = (tree_cpu(sink.process.pid) - sink0) * per
    own = (tree_cpu(root) - own0) * per if root else None
    return Costs(
        args.messages / wall, busy, (idle1 - idle0) * per, load_cpu, sink_cpu,
        busy - load_cpu - sink_cpu, own,
    )  # fmt: skip


def show(label: str, reuse: bool, costs: Costs) -> None:
    own = f"{costs.measured:9.0f}" if costs.measured is not None else " " * 9
    mode = "reuse" if reuse else "conn"
    print(
        f"{label:<31}{mode:<7}{costs.rate:8.0f}/s{costs.relay:10.0f}{own}"
        f"{costs.load:9.0f}{costs.sink:9.0f}{costs.idle:9.0f}",
        flush=True,
    )


def show_threads(
    root: int, before: dict[tuple[int, int], tuple[str, float, float]], n: int
) -> None:
    after = threads(root)
    for key in sorted(after):
        name, user, system = after[key]
        _, user0, system0 = before.get(key, (name, 0.0, 0.0))
        spent = (user - user0 + system - system0) * 1e6 / n
        if spent >= 1:
            print(
                f"    pid {key[0]} thread {key[1]} ({name}): {spent:.0f} µs/msg "
                f"(user {(user - user0) * 1e6 / n:.0f}, system {(system - system0) * 1e6 / n:.0f})"
            )


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--workers-list", type=integers, default=sorted({1, cores}))
    parser.add_argument("--threads", action="store_true", help="each smtpgate thread's share")
    parser.add_argument(
        "--pinned", action="store_true", help="also the most workers, cpu_affinity: per-core"
    )
    args = parser.parse_args()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(
        f"{args.messages} messages of {args.size} bytes, {args.sessions} sessions, {cores} cores; "
        "CPU in µs per message"
    )
    print(
        f"{'relay':<31}{'mode':<7}{'rate':>10}{'relay+krn':>10}{'gateway':>9}"
        f"{'load':>9}{'sink':>9}{'idle':>9}"
    )
    sink = Sink()
    try:
        for workers, pinned in variants(args.workers_list, args.pinned):
            with tempfile.TemporaryDirectory() as directory:
                gateway = start_smtpgate(
                    Path(directory), sink, workers=workers, api=False, pinned=pinned
                )
                root = gateway.process.pid
                try:
                    warm_up(gateway.port, sink, args)
                    for reuse in (False, True):
                        before = threads(root)
                        costs = measure(gateway.port, sink, args, reuse, root)
                        label = f"smtpgate, {workers} worker{'s' * (workers > 1)}"
                        show(label + (", pinned" if pinned else ""), reuse, costs)
                        if args.threads:
                            show_threads(root, before, args.messages)
                finally:
                    stop_smtpgate(gateway)
        instance = Postfix(instance_directory(), free_port(), ("127.0.0.1", sink.port))
        instance.start()
        try:
            warm_up(instance.port, sink, args)
            for reuse in (False, True):
                show("postfix", reuse, measure(instance.port, sink, args, reuse, None))
        finally:
            instance.stop()
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
