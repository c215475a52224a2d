"""Privilege drop: ``smtpgate serve`` started as root binds port 25 in a network
namespace of its own, then answers as ``gateway.user`` (nobody), its API child
too, with every file under ``data_dir`` owned by that user; without the
setting it refuses to start as root.

The namespace is also a mount namespace: this machine's Python lives under
``/root`` (0700), which no other user can enter, so inside it ``/root`` is an
empty 0755 tmpfs with the interpreter's directory bound back in, as a normal
installation's world-readable interpreter would be. Nothing outside changes.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMTPGATE, base_config

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter")),
    reason="needs root, unshare and nsenter (util-linux)",
)

PREFIX = str(Path(sys.base_prefix).resolve())
NAMESPACE_SETUP = (
    "mount --make-rprivate / && mkdir -p {keep} && mount --bind {prefix} {keep} && "
    "mount -t tmpfs -o mode=0755 tmpfs /root && mkdir -p {prefix} && "
    "mount --bind {keep} {prefix} && {python} -c '{lo_up}' && exec {command}"
)
# `ip link set lo up` without iproute2: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP
LO_UP = (
    "import fcntl, socket, struct; s = socket.socket(); "
    'got = fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0)); '
    'flags = struct.unpack("16sH", got[:18])[1]; '
    'fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))'
)
CLIENT = """
import smtplib
with smtplib.SMTP(timeout=20) as client:
    code, banner = client.connect("127.0.0.1", 25)
    print(code, banner.decode())
    client.sendmail("bob@example.org", ["alice@example.com"], b"Subject: p\\r\\n\\r\\nhi\\r\\n")
print("sent")
"""


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="smtpgate-priv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(directory: Path, **gateway: object) -> Path:
    document = base_config(directory / "data", 2526)  # nothing listens there: deferred
    document["gateway"].update(gateway)
    document["spoof_detection"] = False
    document["listeners"][0]["address"] = "127.0.0.1:25"
    document["admin"] = {"listen": "127.0.0.1:8025"}
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)  # read as root, before the drop
    return path


def _start(config: Path, keep: Path) -> tuple[subprocess.Popen[str], list[str]]:
    command = f"{SMTPGATE} serve --config {config} --log-level info"
    script = NAMESPACE_SETUP.format(
        keep=keep, prefix=PREFIX, command=command, python=sys.executable, lo_up=LO_UP
    )
    environment = {k: v for k, v in os.environ.items() if k != "SMTPGATE_ALLOW_ROOT"}
    process = subprocess.Popen(
        ["unshare", "-m", "-n", "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return process, lines


def _wait_ready(process: subprocess.Popen[str], lines: list[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any("gateway ready" in line for line in lines):
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError("smtpgate serve did not start:\n" + "".join(lines)[-3000:])


def _uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Uid:"))
    return [int(x) for x in line.split()[1:]]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(x) for x in (task / "children").read_text().split()]
    return found


def test_serve_as_root_binds_port_25_then_runs_as_nobody(world_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    config = _config(world_dir, user="nobody")
    process, lines = _start(config, world_dir / "keep")
    try:
        _wait_ready(process, lines)
        client = subprocess.run(
            ["nsenter", "-t", str(process.pid), "-n", sys.executable, "-c", CLIENT],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert client.returncode == 0, client.stderr + "".join(lines)[-3000:]
        assert client.stdout.startswith("220 gw.test ESMTP"), client.stdout  # the 220 greeting
        assert "sent" in client.stdout
        assert _uids(process.pid) == [nobody.pw_uid] * 4  # real, effective, saved, fs
        children = _children(process.pid)  # the API and the worker processes, if any
        assert children
        assert {child: _uids(child) for child in children} == {
            child: [nobody.pw_uid] * 4 for child in children
        }
        data = world_dir / "data"
        owners = {str(path): path.lstat().st_uid for path in [data, *data.rglob("*")]}
        assert (data / "queue").is_dir()
        assert (data / "config.db").exists()
        assert {p: u for p, u in owners.items() if u != nobody.pw_uid} == {}
        assert any("privileges dropped" in line and "nobody" in line for line in lines)
    finally:
        process.terminate()
        process.wait(30)
    assert process.returncode == 0, "".join(lines)[-2000:]


def test_serve_as_root_without_gateway_user_refuses(world_dir: Path) -> None:
    config = _config(world_dir)
    process, lines = _start(config, world_dir / "keep")
    assert process.wait(30) == 1
    time.sleep(0.2)  # the reader thread's last lines
    output = "".join(lines)
    assert "refusing to serve as root" in output
    assert "gateway.user" in output
    assert "gateway.allow_root" in output
    assert not (world_dir / "data" / "queue").exists()  # refused before making anything


def test_config_check_names_an_unknown_user(world_dir: Path) -> None:
    config = _config(world_dir, user="no-such-user-here", group="nogroup")
    done = subprocess.run(
        [SMTPGATE, "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0  # checked maybe elsewhere than where it runs: a warning
    assert "warning: gateway.user: no user 'no-such-user-here' on this host" in done.stderr
    assert "gateway.group" not in done.stderr
