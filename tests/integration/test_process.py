"""``smtpgate serve`` as a real process: shutdown, memory, configuration errors."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import subprocess
from pathlib import Path

import psutil

from tests.conftest import SMTPGATE, Certs, GatewayProcess, SinkHandle, worker_pids


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220")
    return reader, writer


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes
) -> bytes:
    writer.write(line + b"\r\n")
    reply = await asyncio.wait_for(reader.readline(), 10)
    while reply[3:4] == b"-":
        reply = await asyncio.wait_for(reader.readline(), 10)
    return reply


async def test_sigterm_lets_data_finish_and_tells_idle_clients_421(
    gateway_process: object, sink: SinkHandle
) -> None:
    gw: GatewayProcess = gateway_process(sink.port)  # type: ignore[operator]
    idle_r, idle_w = await _open(gw.port)
    await _command(idle_r, idle_w, b"EHLO idle.example")
    busy_r, busy_w = await _open(gw.port)
    await _command(busy_r, busy_w, b"EHLO busy.example")
    await _command(busy_r, busy_w, b"MAIL FROM:<a@x.example>")
    await _command(busy_r, busy_w, b"RCPT TO:<alice@example.com>")
    assert (await _command(busy_r, busy_w, b"DATA")).startswith(b"354")
    busy_w.write(b"Subject: in flight\r\n\r\nfirst half\r\n")
    await busy_w.drain()
    await asyncio.sleep(0.2)

    gw.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(idle_r.readline(), 10) == (
        b"421 4.3.2 Service shutting down, try again later\r\n"
    )
    await asyncio.sleep(0.3)
    busy_w.write(b"second half\r\n.\r\n")
    reply = await asyncio.wait_for(busy_r.readline(), 10)
    assert reply.startswith(b"250 2.0.0")
    assert (await asyncio.wait_for(busy_r.readline(), 10)).startswith(b"421 4.3.2")
    assert await asyncio.to_thread(gw.process.wait, 20) == 0
    # The message got 250, so it is in the queue if not yet delivered: a restart sends it.
    if not sink.messages():
        gateway_process(sink.port)  # type: ignore[operator]
    [(_, body)] = await sink.wait_for(1)
    assert b"first half\r\nsecond half\r\n" in body
    try:
        await asyncio.open_connection("127.0.0.1", gw.port)
    except OSError:
        pass
    else:
        raise AssertionError("the gateway still accepts connections after shutdown")


async def test_50_mb_message_streams_without_growing_memory(
    gateway_process: object, sink: SinkHandle
) -> None:
    gw: GatewayProcess = gateway_process(  # type: ignore[operator]
        sink.port, limits={"max_message_size": 60_000_000}, gateway={"workers": 2}
    )
    supervisor = psutil.Process(gw.process.pid)
    workers = [psutil.Process(pid) for pid in worker_pids(gw.process.pid).values()]
    assert len(workers) == 2

    def rss() -> int:  # the gateway's processes, whichever worker takes the message
        return sum(p.memory_info().rss for p in (supervisor, *workers))

    line = b"x" * 76 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (50_000_000 // len(line))

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=120) as client:
            client.sendmail("a@x.example", ["alice@example.com"], body)

    await asyncio.to_thread(send)  # warm-up: imports, buffers, allocator arenas
    before = rss()
    peak = before
    sending = asyncio.create_task(asyncio.to_thread(send))
    while not sending.done():
        peak = max(peak, rss())
        await asyncio.sleep(0.01)
    await sending
    growth = peak - before
    print(f"50 MB message through 2 workers: the gateway's RSS grew {growth / 1e6:.1f} MB")
    assert growth < 16 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB for a 50 MB message"
    stored = [meta["size"] for meta, _ in await sink.wait_for(2, timeout=60)]
    assert len(stored) == 2
    assert all(size > 50_000_000 for size in stored)


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    argv = [SMTPGATE, "config", "check", "--config", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def test_config_check_names_every_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "hosted_domains: [example.com, 'bad..domain']\n"
        "listeners:\n"
        "  - {name: mx, address: '127.0.0.1:99999'}\n"
        "  - {name: mx, address: '127.0.0.1:2525', security: starttls}\n"
        "  - {name: sub, address: '127.0.0.1:2587', securty: none}\n"
    )
    result = _check(path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for expected in ("hosted_domains[1]", "listeners[0].address", "listeners[2].securty"):
        assert expected in result.stderr


def test_config_check_reports_cross_field_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listeners:\n"
        "  - {name: mx, address: '127.0.0.1:2525', security: starttls}\n"
        "  - {name: mx, address: '127.0.0.1:2525', security: none}\n"
    )
    result = _check(path)
    assert result.returncode == 1
    assert (
        "listeners[0].certificate: listener 'mx': security starttls needs a server certificate"
        in result.stderr
    )
    assert "listeners[1].name: duplicate name 'mx'" in result.stderr
    assert "listeners[1].address: 127.0.0.1:2525 is already used" in result.stderr


def test_config_check_accepts_the_example_and_warns_about_smtps_on_25(
    tmp_path: Path, certs: Certs
) -> None:
    example = Path(__file__).parents[2] / "examples" / "gateway.yaml"
    result = _check(example)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "smtps25.yaml"
    path.write_text(
        f"certificates: [{{name: c, cert: {certs.cert_file}, key: {certs.key_file}}}]\n"
        "listeners: [{name: mx, address: '127.0.0.1:25', security: implicit-tls, certificate: c}]\n"
    )
    result = _check(path)
    assert result.returncode == 0
    assert "not RFC-compliant" in result.stderr
    assert "465" in result.stderr


def test_serve_with_a_bad_configuration_says_why(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listeners: [{name: mx, address: nowhere}]\n")
    result = subprocess.run(
        [SMTPGATE, "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 1
    assert "listeners[0].address" in result.stderr
    assert "Traceback" not in result.stderr
