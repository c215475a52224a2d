"""Profile the durable relay path: smtp-source → ``smtpgate serve`` → smtp-sink.

Starts smtp-sink and ``smtpgate serve`` with the configuration of
``benchmarks/relay.py`` (a full-relay profile for 127.0.0.0/8, one smarthost
connector to the sink, the REST API listening, ``gateway.workers: 1`` when
the gateway knows the setting), attaches ``py-spy record
--format raw`` (collapsed stacks) to the gateway for the length of the load,
drives it with smtp-source (one message per connection, then with ``-d``
reuse) and prints the top self-time and inclusive-time functions of the
recorded stacks, plus the throughput of each run and the gateway's CPU time
per message (user + system from /proc: on a shared machine a steadier
figure than messages per second).

Usage::

    .venv/bin/python benchmarks/profile_relay.py [--messages N] [--sessions 20]
        [--size 1000] [--mode both|conn|reuse] [--top 25] [--out DIR] [--gil]
        [--no-profile] [--repeat N] [--sink-args "-p"]
        [--set queue.connection_cache_time=0]

``--gil`` keeps only the stacks holding the GIL: the view to read. Without
it, threads waiting in C (uvloop's epoll, SQLite's fsync, futexes) are often
sampled as busy, and time spent in uvloop shows as ``Runner.run`` self time.
Self time of a Python function includes the C it calls (``transport.write``
is ``Session._after_pump``'s self time). ``--native`` adds C frames.
``--no-profile`` measures throughput only (py-spy's sampling costs a little);
``--sink-args -p`` makes smtp-sink stop announcing PIPELINING; ``--set``
overrides a dotted configuration key (repeatable, YAML values).
``--report FILE`` only aggregates an existing collapsed-stack file.

The shell recipe it automates::

    smtp-sink -u postfix -c 127.0.0.1:SINKPORT 1000 &
    smtpgate serve --config gw.yaml --log-level warning &
    py-spy record --format raw -o relay.txt --pid $GATEWAY_PID &
    smtp-source -c -l 1000 -m 3000 -s 20 -f sender@bench.example \\
        -t rcpt@far.example 127.0.0.1:PORT        # and again with -d
    kill -INT $PYSPY_PID
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, smtp_source, wait_for
from relay import Sink

BIN = Path(sys.executable).with_name("smtpgate")
PYSPY = Path(sys.executable).with_name("py-spy")


def _set(config: dict, dotted: str) -> None:
    key, _, value = dotted.partition("=")
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)


def _check(path: Path, config: dict) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [BIN, "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def start_smtpgate(
    directory: Path, sink: Sink, overrides: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config: dict = {
        # As root, serve refuses to run unless told which user to become or
        # allowed to stay root; the profile is the same either way.
        "gateway": {
            "hostname": "gw.bench",
            "data_dir": str(directory / "data"),
            **({"allow_root": True} if os.geteuid() == 0 else {}),
        },
        "hosted_domains": ["bench.example"],
        "spoof_detection": False,
        "listeners": [{"name": "mx", "address": f"127.0.0.1:{port}", "security": "none"}],
        "limits": {"max_connections_per_ip": 1000},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "connection_profiles": [
            {"name": "loopback", "client_hosts": ["127.0.0.0/8"], "relay": "full"}
        ],
        "send_connectors": [
            {
                "name": "sink",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink.port}},
            }
        ],
    }
    for dotted in overrides:
        _set(config, dotted)
    path = directory / "gw.yaml"
    # One worker process, so that py-spy follows the one process serving SMTP;
    # a gateway that does not know the setting runs one process anyway.
    config["gateway"]["workers"] = 1
    check = _check(path, config)
    if check.returncode != 0 and "gateway.workers" in check.stdout + check.stderr:
        del config["gateway"]["workers"]
        check = _check(path, config)
    if check.returncode != 0:
        raise SystemExit(f"config check refused the configuration:\n{check.stdout}{check.stderr}")
    process = subprocess.Popen(
        [BIN, "serve", "--config", str(path), "--log-level", "warning"],
        stderr=(directory / "serve.log").open("wb"),
    )
    try:
        wait_for(port, attempts=1200)
    except RuntimeError:
        process.terminate()
        sys.stderr.write((directory / "serve.log").read_text())
        raise
    return process, port


def run_load(port: int, sink: Sink, args: argparse.Namespace, *, reuse: bool) -> float:
    before = sink.count
    start = time.perf_counter()
    subprocess.run(
        smtp_source(port, args, "rcpt@far.example", reuse=reuse),
        check=True,
        capture_output=True,
        timeout=600,
    )
    if not sink.wait_until(before + args.messages, 600):
        raise RuntimeError(f"only {sink.count - before} of {args.messages} arrived")
    return args.messages / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time the process has used so far (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


# --- the aggregator -------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _function(frame: str) -> str:
    """``name (path/file.py:123)`` → ``name (path/file.py)``: one row per function."""
    match = _FRAME.match(frame)
    return f"{match['func']} ({match['file']})" if match else frame


def aggregate(path: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread (")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [f"{total} samples (active, non-idle stacks)", "", f"top {top} self time:"]
    for name, count in own.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {count:6d}  {name}")
    lines += ["", f"top {top} inclusive time:"]
    for name, count in inclusive.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {count:6d}  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--mode", choices=("both", "conn", "reuse"), default="both")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("/tmp"))
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument(
        "--gil", action="store_true", help="py-spy --gil: only stacks holding the GIL"
    )
    parser.add_argument("--sink-args", default="", help="extra smtp-sink flags, e.g. -p")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode (throughput)")
    parser.add_argument("--report", type=Path, help="only aggregate this collapsed-stack file")
    args = parser.parse_args()
    if args.report:
        print(aggregate(args.report, args.top))
        return
    modes = {"both": (False, True), "conn": (False,), "reuse": (True,)}[args.mode]
    args.out.mkdir(parents=True, exist_ok=True)
    sink = Sink(tuple(args.sink_args.split()))
    try:
        with tempfile.TemporaryDirectory() as directory:
            gateway, port = start_smtpgate(Path(directory), sink, args.set)
            try:
                # Warm-up: the first connections pay imports and cache fills.
                warm = argparse.Namespace(messages=50, sessions=5, size=args.size)
                run_load(port, sink, warm, reuse=False)
                for reuse in modes:
                    measure(gateway.pid, port, sink, args, reuse=reuse)
            finally:
                gateway.terminate()
                gateway.wait(60)
    finally:
        sink.stop()


def measure(pid: int, port: int, sink: Sink, args: argparse.Namespace, *, reuse: bool) -> None:
    """One load (``args.repeat`` runs), recorded by py-spy unless ``--no-profile``."""
    label = "reuse" if reuse else "conn"
    raw = args.out / f"profile-relay-{label}.txt"
    spy = None
    if not args.no_profile:
        command = [PYSPY, "record", "--format", "raw", "--rate", str(args.rate)]
        command += ["--native"] if args.native else []
        command += ["--gil"] if args.gil else []
        command += ["-o", str(raw), "--pid", str(pid)]
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    cpu = cpu_seconds(pid)
    rates = [run_load(port, sink, args, reuse=reuse) for _ in range(args.repeat)]
    user, system = (b - a for a, b in zip(cpu, cpu_seconds(pid), strict=True))
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    shown = " ".join(f"{r:.0f}/s" for r in rates)
    per = 1000 / (args.messages * args.repeat)
    print(
        f"{label}: {args.messages} messages x {args.repeat}: {shown}; "
        f"gateway CPU {per * (user + system):.2f} ms/message "
        f"(user {per * user:.2f}, system {per * system:.2f})",
        flush=True,
    )
    if spy is not None:
        print(f"collapsed stacks: {raw}")
        print(aggregate(raw, args.top), flush=True)
        print()


if __name__ == "__main__":
    main()
