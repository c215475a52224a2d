"""Memory of a running gateway: one 50 MB message, and idle connections.

Starts ``smtpgate serve`` and ``smtpgate sink`` as processes on loopback and
prints (1) the peak RSS growth of the gateway while a 50 MB message passes
through it, after a warm-up message, and (2) the RSS per idle connection
(after EHLO) over 1000 connections. Usage: ``python benchmarks/memory.py``.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from common import free_port, wait_for

BIN = Path(sys.executable).with_name("smtpgate")


def start(tmp: Path) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], int]:
    sink_port, gw_port = free_port(), free_port()
    sink = subprocess.Popen(
        [
            BIN,
            "sink",
            "--listen",
            f"127.0.0.1:{sink_port}",
            "--dir",
            str(tmp / "sink"),
            "--no-fsync",
        ],
        stdout=subprocess.DEVNULL,
    )
    config = {
        "gateway": {"hostname": "gw.test", "data_dir": str(tmp / "gw")},
        "hosted_domains": ["example.com"],
        "admin": {"listen": ""},  # measured without the REST API
        "listeners": [{"name": "mx", "address": f"127.0.0.1:{gw_port}", "security": "none"}],
        "limits": {
            "max_message_size": 60_000_000,
            "max_connections": 5000,
            "max_connections_per_ip": 5000,
        },
        "send_connectors": [
            {
                "name": "sink",
                "security": "none",
                "deliver": {"smarthost": {"host": "127.0.0.1", "port": sink_port}},
            }
        ],
    }
    (tmp / "gw.yaml").write_text(yaml.safe_dump(config))
    gateway = subprocess.Popen(
        [BIN, "serve", "--config", str(tmp / "gw.yaml"), "--log-level", "warning"]
    )
    wait_for(sink_port)
    wait_for(gw_port)
    return sink, gateway, gw_port


def send_big(port: int) -> None:
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (50_000_000 // len(line))
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        client.sendmail("a@x.example", ["alice@example.com"], body)


def big_message(process: psutil.Process, port: int) -> float:
    send_big(port)
    before = process.memory_info().rss
    peak = before
    worker = threading.Thread(target=send_big, args=(port,))
    worker.start()
    while worker.is_alive():
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.005)
    return (peak - before) / 1e6


def idle_connections(process: psutil.Process, port: int, count: int = 1000) -> float:
    before = process.memory_info().rss
    sockets = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.recv(200)
        conn.sendall(b"EHLO idle.example\r\n")
        conn.recv(1000)
        sockets.append(conn)
    time.sleep(0.5)
    per = (process.memory_info().rss - before) / count
    for conn in sockets:
        conn.close()
    return per


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        sink, gateway, port = start(Path(directory))
        try:
            process = psutil.Process(gateway.pid)
            growth = big_message(process, port)
            print(f"peak RSS growth while relaying one 50 MB message: {growth:.1f} MB")
            per = idle_connections(process, port)
            print(f"RSS per idle connection (1000 after EHLO): {per / 1024:.1f} KiB")
        finally:
            gateway.terminate()
            sink.terminate()
            gateway.wait(30)
            sink.wait(30)


if __name__ == "__main__":
    main()
