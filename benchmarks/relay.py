"""End-to-end durable relay: smtp-source → gateway → smtp-sink, against Postfix.

Both relays queue durably before answering 250 and hand every message on to
Postfix's smtp-sink; the time measured runs from the first connection until
the sink has counted every message. One message per connection, then with
connection reuse (``smtp-source -d``). Postfix runs as a private instance
(tests/postfix.py: mynetworks 127.0.0.0/8, relayhost the sink, defaults
otherwise); smtpgate runs ``smtpgate serve`` with an equivalent
configuration (a full-relay profile for 127.0.0.0/8, one smarthost
connector). Needs root, Debian's postfix, and the project installed.

The smtpgate rows run with the REST API listening; the row "+ API load"
repeats the run while a client reads ``/api/v1/status`` and
``/api/v1/config/diff`` as fast as it can, to show what admin traffic costs
SMTP (the API runs in its own thread of the same process).

Usage: ``python benchmarks/relay.py [--messages N] [--sessions N] [--size B]``
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from common import free_port, smtp_source, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.postfix import Postfix, instance_directory

BIN = Path(sys.executable).with_name("smtpgate")


class Sink:
    """Postfix's smtp-sink with a running counter we can wait on."""

    def __init__(self) -> None:
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            ["smtp-sink", *user, "-c", f"127.0.0.1:{self.port}", "1000"],
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


def start_smtpgate(directory: Path, sink: Sink) -> tuple[subprocess.Popen[bytes], int, str, str]:
    port = free_port()
    api_port = free_port()
    config = {
        "gateway": {"hostname": "gw.bench", "data_dir": str(directory / "data")},
        "hosted_domains": ["bench.example"],
        "spoof_detection": False,
        "listeners": [{"name": "mx", "address": f"127.0.0.1:{port}", "security": "none"}],
        "limits": {"max_connections_per_ip": 1000},
        "admin": {"listen": f"127.0.0.1:{api_port}"},
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
    token = subprocess.run(
        [BIN, "admin", "token", "create", "bench", "--config", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    process = subprocess.Popen(
        [BIN, "serve", "--config", str(path), "--log-level", "warning"],
        stderr=subprocess.DEVNULL,
    )
    wait_for(port)
    wait_for(api_port)
    return process, port, f"http://127.0.0.1:{api_port}", token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000)
    args = parser.parse_args()
    print(
        f"{args.messages} messages of {args.size} bytes, {args.sessions} parallel sessions, "
        f"{os.cpu_count()} cores; durable queue in both, delivered to smtp-sink"
    )
    print(f"{'relay':<22}{'1 msg/conn':>14}{'reuse (-d)':>14}")
    sink = Sink()
    try:
        with tempfile.TemporaryDirectory() as directory:
            gateway, port, url, token = start_smtpgate(Path(directory), sink)
            try:
                ours = (
                    run_load(port, sink, args, reuse=False),
                    run_load(port, sink, args, reuse=True),
                )
                print(f"{'smtpgate':<22}{ours[0]:>10.0f}/s{ours[1]:>10.0f}/s", flush=True)
                admin = ApiLoad(url, token)
                admin.start()
                started = time.perf_counter()
                loaded = (
                    run_load(port, sink, args, reuse=False),
                    run_load(port, sink, args, reuse=True),
                )
                admin.halt.set()
                admin.join()
                rate = admin.count / (time.perf_counter() - started)
                print(
                    f"{'smtpgate + API load':<22}{loaded[0]:>10.0f}/s{loaded[1]:>10.0f}/s"
                    f"   ({rate:.0f} API requests/s meanwhile)",
                    flush=True,
                )
            finally:
                gateway.terminate()
                gateway.wait(60)
        postfix = Postfix(instance_directory(), free_port(), ("127.0.0.1", sink.port))
        postfix.start()
        try:
            theirs = (
                run_load(postfix.port, sink, args, reuse=False),
                run_load(postfix.port, sink, args, reuse=True),
            )
        finally:
            postfix.stop()
        print(f"{'postfix':<22}{theirs[0]:>10.0f}/s{theirs[1]:>10.0f}/s")
        print(
            f"smtpgate / postfix: {ours[0] / theirs[0]:.2f}x per connection, "
            f"{ours[1] / theirs[1]:.2f}x with reuse"
        )
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
