"""End-to-end durable relay: smtp-source → gateway → smtp-sink, against Postfix.

Both relays queue durably before answering 250 and hand every message on to
Postfix's smtp-sink; the time measured runs from the first connection until
the sink has counted every message. One message per connection, then with
connection reuse (``smtp-source -d``). Postfix runs as a private instance
(tests/postfix.py: mynetworks 127.0.0.0/8, relayhost the sink, defaults
otherwise); smtpgate runs ``smtpgate serve`` with an equivalent
configuration (a full-relay profile for 127.0.0.0/8, one smarthost
connector). Needs root, Debian's postfix, and the project installed.

smtpgate runs once per ``gateway.workers`` value of ``--workers-list``
(default ``1,<cores>``: one worker process, then one per core, sharing the
listening socket), and every message size of ``--sizes`` is measured against
each instance; Postfix is started once. Beside each smtpgate rate is the peak
RSS of the gateway: the sum of VmHWM over the process tree of ``smtpgate
serve`` (its workers and API child), read from /proc after the size's runs;
VmHWM only grows, so it is the peak so far of that instance, and pages the
processes share (forked workers) count once per process. Each relay first
gets 100 unmeasured messages of 1000 bytes.

The smtpgate rows run with the REST API listening; the row "+ API load"
repeats the run (with the most workers) while a client reads
``/api/v1/status`` and ``/api/v1/config/diff`` as fast as it can, to show
what admin traffic costs SMTP.

Usage: ``python benchmarks/relay.py [--messages N] [--sessions N]
[--sizes 1000,10000,100000] [--workers-list 1,N] [--pinned]``
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from common import free_port, smtp_source, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.postfix import Postfix, instance_directory

BIN = Path(sys.executable).with_name("smtpgate")
BIG = 100_000  # from this message size on, --messages is divided by 3


class Sink:
    """Postfix's smtp-sink with a running counter we can wait on."""

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            ["smtp-sink", *user, *extra, "-c", f"127.0.0.1:{self.port}", "1000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.count = 0
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(self.port)

    def _read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        while chunk := self.process.stdout.read1(4096):  # type: ignore[attr-defined]
            buffer = (buffer + chunk)[-200:]
            found = re.findall(rb"mesg=(\d+)", buffer)
            if found:
                self.count = int(found[-1])

    def wait_until(self, total: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < total and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.count >= total

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# --- /proc: the process tree of a gateway (psutil is not assumed) -------------


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS); 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_kib(root: int, key: str = "VmHWM") -> int:
    """The sum of ``key`` over the process tree of ``root``, in KiB."""
    return sum(status_kib(pid, key) for pid in tree_pids(root))


def tree_cpu(root: int) -> float:
    """User + system CPU seconds of the live processes of the tree of ``root``."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


# --- load -----------------------------------------------------------------------


def messages_for(size: int, messages: int) -> int:
    return max(1, messages // 3) if size >= BIG else messages


def run_load(port: int, sink: Sink, load: argparse.Namespace, *, reuse: bool) -> float:
    """Messages per second, from the first connection until the sink counted them all.

    ``load`` has messages, size and sessions (smtp-source -m, -l, -s).
    """
    before = sink.count
    start = time.perf_counter()
    subprocess.run(
        smtp_source(port, load, "rcpt@far.example", reuse=reuse),
        check=True,
        capture_output=True,
        timeout=900,
    )
    if not sink.wait_until(before + load.messages, 900):
        raise RuntimeError(f"only {sink.count - before} of {load.messages} arrived")
    return float(load.messages / (time.perf_counter() - start))


def warm_up(port: int, sink: Sink, args: argparse.Namespace) -> None:
    """Unmeasured: a fresh relay's first messages pay for imports, workers, connections."""
    load = argparse.Namespace(messages=min(100, args.messages), size=1000, sessions=args.sessions)
    run_load(port, sink, load, reuse=False)


def both_modes(port: int, sink: Sink, size: int, args: argparse.Namespace) -> tuple[float, float]:
    """(1 message per connection, reuse) rates for messages of ``size``."""
    load = argparse.Namespace(
        messages=messages_for(size, args.messages), size=size, sessions=args.sessions
    )
    return run_load(port, sink, load, reuse=False), run_load(port, sink, load, reuse=True)


class ApiLoad(threading.Thread):
    """Admin requests back to back until stopped; ``count`` says how many."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.count = 0
        self.halt = threading.Event()

    def run(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url + "/api/v1", headers=headers) as client:
            while not self.halt.is_set():
                for path in ("/status", "/config/diff"):
                    client.get(path).raise_for_status()
                    self.count += 1


def workers_supported() -> bool:
    """Whether this smtpgate's configuration knows ``gateway.workers`` yet."""
    from smtpgate.config.schema import GatewaySettings

    return "workers" in GatewaySettings.model_fields


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    url: str
    token: str


def start_smtpgate(  # noqa: PLR0913 - the instance and how it runs
    directory: Path,
    sink: Sink,
    *,
    workers: int | None = None,
    limits: dict[str, Any] | None = None,
    api: bool = True,
    pinned: bool = False,
) -> Gateway:
    """``smtpgate serve`` relaying everything from 127.0.0.0/8 to ``sink``.

    ``gateway.workers`` is written only when ``workers`` is not None (older
    configurations refuse the key). Started as root, it runs as root
    (SMTPGATE_ALLOW_ROOT=1), like the private Postfix's master.
    """
    port = free_port()
    api_port = free_port()
    gateway: dict[str, Any] = {"hostname": "gw.bench", "data_dir": str(directory / "data")}
    if workers is not None:
        gateway["workers"] = workers
    if pinned:
        gateway["cpu_affinity"] = "per-core"
    config = {
        "gateway": gateway,
        "hosted_domains": ["bench.example"],
        "spoof_detection": False,
        "listeners": [{"name": "mx", "address": f"127.0.0.1:{port}", "security": "none"}],
        "limits": {"max_connections_per_ip": 1000, **(limits or {})},
        "admin": {"listen": f"127.0.0.1:{api_port}" if api else ""},
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
    path = directory / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    environment = {**os.environ, "SMTPGATE_ALLOW_ROOT": "1"}
    token = ""
    if api:
        token = subprocess.run(
            [BIN, "admin", "token", "create", "bench", "--config", str(path)],
            capture_output=True,
            text=True,
            check=True,
            env=environment,
        ).stdout.strip()
    log = directory / "serve.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [BIN, "serve", "--config", str(path), "--log-level", "warning"],
            stderr=stderr,
            env=environment,
        )
    if not all(serving(process, waited) for waited in ((port, api_port) if api else (port,))):
        process.terminate()
        process.wait(30)
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"smtpgate serve did not start:\n{tail}")
    return Gateway(process, port, f"http://127.0.0.1:{api_port}", token)


def serving(process: subprocess.Popen[bytes], port: int, timeout: float = 60) -> bool:
    """Whether ``process`` listens on ``port`` before it exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return True
    return False


def stop_smtpgate(gateway: Gateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(60)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()


# --- the table ------------------------------------------------------------------


@dataclass
class Row:
    label: str
    rates: dict[int, tuple[float, float]] = field(default_factory=dict)  # size → (conn, reuse)
    rss_mib: dict[int, float] = field(default_factory=dict)  # size → peak RSS so far
    note: dict[int, str] = field(default_factory=dict)


def print_row(row: Row, size: int) -> None:
    conn, reuse = row.rates[size]
    rss = f"{row.rss_mib[size]:>9.0f} MiB" if size in row.rss_mib else " " * 13
    note = f"  {row.note[size]}" if size in row.note else ""
    print(f"{size:>8} B  {row.label:<32}{conn:>10.0f}/s{reuse:>10.0f}/s{rss}{note}", flush=True)


def markdown(rows: list[Row], postfix: Row, sizes: list[int], messages: int) -> str:
    lines = [
        "| size | messages | relay | 1 msg/conn | reuse (-d) | vs postfix (conn) "
        "| vs postfix (reuse) | peak RSS |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        theirs = postfix.rates[size]
        for row in [*rows, postfix]:
            conn, reuse = row.rates[size]
            ratios = (
                f"{conn / theirs[0]:.2f}x | {reuse / theirs[1]:.2f}x"
                if row is not postfix
                else "1.00x | 1.00x"
            )
            rss = f"{row.rss_mib[size]:.0f} MiB" if size in row.rss_mib else ""
            lines.append(
                f"| {size} B | {messages_for(size, messages)} | {row.label} "
                f"| {conn:.0f}/s | {reuse:.0f}/s | {ratios} | {rss} |"
            )
    return "\n".join(lines)


def variants(workers_list: list[int], pinned: bool) -> list[tuple[int, bool]]:
    """(workers, pinned) per smtpgate instance: each count, then the most
    workers pinned (``gateway.cpu_affinity: per-core``) with ``--pinned``."""
    found = [(workers, False) for workers in workers_list]
    if pinned and max(workers_list) > 1:
        found.append((max(workers_list), True))
    return found


def integers(text: str) -> list[int]:
    values = [int(item) for item in text.split(",") if item.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of integers ≥ 1")
    return values


def main() -> None:  # noqa: PLR0915 - one linear script: instances, sizes, table
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--sizes", type=integers, default=[1000, 10000, 100000])
    parser.add_argument(
        "--workers-list",
        type=integers,
        default=sorted({1, cores}),
        help=f"gateway.workers values, one smtpgate instance each (default 1,{cores})",
    )
    parser.add_argument(
        "--pinned",
        action="store_true",
        help="also the most workers with gateway.cpu_affinity: per-core",
    )
    args = parser.parse_args()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    supported = workers_supported()
    if not supported and max(args.workers_list) > 1:
        parser.error("this smtpgate has no gateway.workers yet: use --workers-list 1")
    print(
        f"{args.messages} messages per run ({args.messages // 3} from {BIG} bytes on), "
        f"{args.sessions} parallel sessions, sizes {args.sizes} (smtp-source -l), {cores} cores; "
        "durable queue in both, delivered to smtp-sink"
    )
    if not supported:
        print("(gateway.workers is not known to this smtpgate: one process, key not written)")
    print(f"{'size':>10}  {'relay':<32}{'1 msg/conn':>12}{'reuse (-d)':>12}{'peak RSS':>13}")
    started = time.perf_counter()
    rows: list[Row] = []
    sink = Sink()
    try:
        most = max(args.workers_list)
        for workers, pinned in variants(args.workers_list, args.pinned):
            noun = "worker" if workers == 1 else "workers"
            noun += ", pinned" if pinned else ""
            row = Row(f"smtpgate, {workers} {noun}")
            loaded = Row(f"smtpgate, {workers} {noun} + API load")
            rows.append(row)
            with tempfile.TemporaryDirectory() as directory:
                gateway = start_smtpgate(
                    Path(directory), sink, workers=workers if supported else None, pinned=pinned
                )
                try:
                    warm_up(gateway.port, sink, args)
                    for size in args.sizes:
                        row.rates[size] = both_modes(gateway.port, sink, size, args)
                        row.rss_mib[size] = tree_kib(gateway.process.pid) / 1024
                        print_row(row, size)
                        if workers != most or pinned:
                            continue
                        admin = ApiLoad(gateway.url, gateway.token)
                        admin.start()
                        begun = time.perf_counter()
                        loaded.rates[size] = both_modes(gateway.port, sink, size, args)
                        admin.halt.set()
                        admin.join()
                        rate = admin.count / (time.perf_counter() - begun)
                        loaded.rss_mib[size] = tree_kib(gateway.process.pid) / 1024
                        loaded.note[size] = f"({rate:.0f} API requests/s meanwhile)"
                        print_row(loaded, size)
                finally:
                    stop_smtpgate(gateway)
            if workers == most and not pinned:
                rows.append(loaded)
        postfix = Row("postfix")
        instance = Postfix(instance_directory(), free_port(), ("127.0.0.1", sink.port))
        instance.start()
        try:
            warm_up(instance.port, sink, args)
            for size in args.sizes:
                postfix.rates[size] = both_modes(instance.port, sink, size, args)
                print_row(postfix, size)
        finally:
            instance.stop()
    finally:
        sink.stop()
    print()
    for size in args.sizes:
        theirs = postfix.rates[size]
        for row in rows:
            conn, reuse = row.rates[size]
            print(
                f"{size:>8} B  {row.label + ' / postfix:':<42}{conn / theirs[0]:>6.2f}x per "
                f"connection, {reuse / theirs[1]:.2f}x with reuse"
            )
    print(f"\n(total {time.perf_counter() - started:.0f} s)\n")
    print(markdown(rows, postfix, args.sizes, args.messages))


if __name__ == "__main__":
    main()
