"""What spam scanning by rspamd costs: relay throughput with scanning on and off,
and the latency it adds to each message, in one run.

A private rspamd (tests/rspamd.py: Debian's rules, one or more normal workers on
loopback, the modules that ask the network off) and two ``smtpgate serve``
processes, identical but for ``spam.rspamd``, each relaying to Postfix's
smtp-sink (relay.py's ``Sink``). The loopback clients get a ``full`` profile
with ``spam.check_outbound``, so every message is scanned when rspamd is set.

1. Throughput: relay.py's load (smtp-source, ``--sessions`` in parallel, one
   message per connection and with reuse), off then on; messages per second
   until the sink has counted every message.
2. Latency: one client sends ``--latency`` messages one after another over one
   connection; the time from the end of DATA to the reply (the scan runs in
   between, the queue's fsync too) is measured per message. p50 and p99 off and
   on; their difference is what scanning adds.
3. Where the time goes: rspamd logs its own processing time per message
   (``time: N ms`` in its task log line); the rest of the added latency is
   ours (HTTP request, streaming the body, parsing the reply, the loopback).

Needs root (rspamd runs as ``nobody``), Debian's rspamd and postfix
(smtp-source, smtp-sink), and the project installed.

Usage: ``python benchmarks/scanning.py [--messages N] [--sessions N] [--size B]
[--latency N] [--rspamd-workers N]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import free_port, wait_for
from relay import BIN, Sink, run_load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.rspamd import Rspamd, start_rspamd


def start_gateway(directory: Path, sink: Sink, rspamd: Rspamd | None) -> tuple[Any, int]:
    port = free_port()
    config: dict[str, Any] = {
        "gateway": {"hostname": "gw.bench", "data_dir": str(directory / "data")},
        "hosted_domains": ["bench.example"],
        "spoof_detection": False,
        "listeners": [{"name": "mx", "address": f"127.0.0.1:{port}", "security": "none"}],
        "limits": {"max_connections_per_ip": 1000},
        "admin": {"listen": ""},
        "spam": {"check_outbound": True},
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
    if rspamd is not None:
        config["spam"]["rspamd"] = {"url": rspamd.url, "timeout": 30, "fail": "closed"}
    directory.mkdir(parents=True)
    path = directory / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [BIN, "serve", "--config", str(path), "--log-level", "warning"],
        stderr=subprocess.DEVNULL,
    )
    wait_for(port)
    return process, port


def message(size: int, n: int) -> bytes:
    head = (
        f"From: Sender <sender@bench.example>\r\nTo: rcpt@far.example\r\n"
        f"Subject: figures {n}\r\nMessage-ID: <{n}.{time.time_ns()}@bench.example>\r\n"
        "Date: Sun, 29 Nov 2026 12:00:00 +0000\r\n\r\n"
    )
    line = "The quarterly figures are attached, as discussed in the meeting.\r\n"
    return (head + line * max(1, (size - len(head)) // len(line))).encode()


def latencies(port: int, count: int, size: int) -> list[float]:
    """Seconds from the end of DATA to the reply, one message after another."""
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.bench.example")
        for n in range(count):
            client.mail("sender@bench.example")
            client.rcpt("rcpt@far.example")
            code, _ = client.docmd("DATA")
            assert code == 354, code
            client.send(message(size, n).replace(b"\r\n.", b"\r\n..") + b".\r\n")
            started = time.perf_counter()
            code, text = client.getreply()
            out.append(time.perf_counter() - started)
            if code != 250:
                raise RuntimeError(f"message {n}: {code} {text!r}")
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def rspamd_times(rspamd: Rspamd, since: int) -> list[float]:
    """rspamd's own time per message (ms), from its log after offset ``since``."""
    with (rspamd.directory / "rspamd.log").open("rb") as log:
        log.seek(since)
        text = log.read().decode("utf-8", "replace")
    return [float(t) for t in re.findall(r"rspamd_task_write_log: .*?, time: ([0-9.]+)ms", text)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (waited for or not)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children = subprocess.run(
        ["pgrep", "-P", str(pid)], check=False, capture_output=True, text=True
    ).stdout
    for each in [pid, *map(int, children.split())]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def log_size(rspamd: Rspamd) -> int:
    path = rspamd.directory / "rspamd.log"
    return path.stat().st_size if path.exists() else 0


def latency_table(rspamd: Rspamd, ports: tuple[int, int], args: argparse.Namespace) -> None:
    """Part 2 and 3: the latency scanning adds, and rspamd's share of it."""
    off_port, on_port = ports
    plain = latencies(off_port, args.latency, args.size)
    mark = log_size(rspamd)
    scanned = latencies(on_port, args.latency, args.size)
    own = rspamd_times(rspamd, mark)
    print(f"\nlatency, end of DATA to the reply, {args.latency} messages one by one (ms)")
    print(f"{'':<24}{'p50':>8}{'p99':>8}{'mean':>8}")
    rows = [("scanning off", plain), ("scanning on", scanned)]
    for name, values in rows:
        ms = [v * 1000 for v in values]
        print(
            f"{name:<24}{percentile(ms, 50):>8.2f}{percentile(ms, 99):>8.2f}"
            f"{statistics.fmean(ms):>8.2f}"
        )
    added = [percentile(scanned, p) * 1000 - percentile(plain, p) * 1000 for p in (50, 99)]
    print(f"{'added by scanning':<24}{added[0]:>8.2f}{added[1]:>8.2f}")
    if own:
        mean_added = (statistics.fmean(scanned) - statistics.fmean(plain)) * 1000
        print(
            f"{'rspamd itself':<24}{percentile(own, 50):>8.2f}{percentile(own, 99):>8.2f}"
            f"{statistics.fmean(own):>8.2f}   ({len(own)} tasks in its log)"
        )
        print(
            f"ours (added - rspamd), mean: {mean_added - statistics.fmean(own):.2f} ms "
            "(HTTP request, streaming the body, the reply's JSON, loopback)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--latency", type=int, default=500)
    parser.add_argument("--rspamd-workers", type=int, default=1)
    args = parser.parse_args()
    print(
        f"{args.messages} messages of {args.size} bytes, {args.sessions} parallel sessions, "
        f"{os.cpu_count()} cores, rspamd with {args.rspamd_workers} normal worker(s); "
        "durable queue, delivered to smtp-sink"
    )
    rspamd = start_rspamd(args.rspamd_workers)
    sink = Sink()
    running: list[Any] = []
    try:
        with tempfile.TemporaryDirectory() as directory:
            off, off_port = start_gateway(Path(directory) / "off", sink, None)
            on, on_port = start_gateway(Path(directory) / "on", sink, rspamd)
            running += [off, on]
            latencies(on_port, 20, args.size)  # warm up rspamd (its first task is slow)
            print(f"{'relay':<24}{'1 msg/conn':>14}{'reuse (-d)':>14}")
            rates = {}
            cpu: dict[str, tuple[float, float]] = {}
            assert rspamd.process is not None
            pairs = (("scanning off", off, off_port), ("scanning on (rspamd)", on, on_port))
            for name, process, port in pairs:
                before = cpu_seconds(process.pid), cpu_seconds(rspamd.process.pid)
                rates[name] = (
                    run_load(port, sink, args, reuse=False),
                    run_load(port, sink, args, reuse=True),
                )
                after = cpu_seconds(process.pid), cpu_seconds(rspamd.process.pid)
                per = 1000 / (2 * args.messages)
                cpu[name] = ((after[0] - before[0]) * per, (after[1] - before[1]) * per)
                first, second = rates[name]
                print(f"{name:<24}{first:>10.0f}/s{second:>10.0f}/s", flush=True)
            a, b = rates["scanning off"], rates["scanning on (rspamd)"]
            print(f"on / off: {b[0] / a[0]:.2f}x per connection, {b[1] / a[1]:.2f}x with reuse")
            print("CPU per message (ms) during those runs:  smtpgate   rspamd")
            for name, (ours, theirs) in cpu.items():
                print(f"  {name:<38}{ours:>8.2f}{theirs:>9.2f}")

            latency_table(rspamd, (off_port, on_port), args)
    finally:
        for process in running:
            process.terminate()
            process.wait(60)
        sink.stop()
        rspamd.stop()
        shutil.rmtree(rspamd.directory, ignore_errors=True)


if __name__ == "__main__":
    main()
