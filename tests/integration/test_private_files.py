"""Everything under data_dir is private (0700 directories, 0600 files), whatever
the umask the gateway was started with.

A local user read a message body (and the clear password of a *credentials
send* mail) from ``queue.db-wal``, created 0644 under the usual umask 022."""

from __future__ import annotations

import os
import smtplib
import stat
import subprocess
from pathlib import Path

import yaml

from tests.conftest import SMTPGATE, base_config, free_port, wait_for_port


def modes(root: Path) -> dict[str, str]:
    found = {}
    for directory, subdirs, files in os.walk(root):
        for name in [".", *subdirs, *files]:
            path = Path(directory) / name
            found[str(path.relative_to(root))] = f"{stat.S_IMODE(path.lstat().st_mode):04o}"
    return found


def test_queue_store_wal_and_bodies_are_private_under_a_loose_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    leftover = data_dir / "notes.txt"
    leftover.write_text("left by an earlier version")
    leftover.chmod(0o644)
    port = free_port()
    document = base_config(data_dir, free_port())  # nothing listens there: mail stays queued
    document["listeners"][0]["address"] = f"127.0.0.1:{port}"
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(document))
    gateway = subprocess.Popen(
        [SMTPGATE, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        umask=0o002,
    )
    try:
        wait_for_port(port, alive=lambda: gateway.poll() is None)
        for n in range(3):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                body = f"Subject: {n}\r\n\r\n".encode() + (b"x" * 78 + b"\r\n") * (2000 * n)
                client.sendmail("", ["alice@example.com"], body)
        found = modes(data_dir)
    finally:
        gateway.terminate()
        out, _ = gateway.communicate(timeout=30)
    assert "queue/queue.db-wal" in found  # the file that leaked, there and private
    assert any(name.startswith("queue/bodies/") and "." not in name[-2:] for name in found)
    loose = {name: mode for name, mode in found.items() if mode not in ("0700", "0600")}
    assert loose == {}
    log = out.decode()
    assert "made private" in log
    assert f"{leftover}: 0644 → 0600" in log


def test_credentials_encrypt_creates_a_private_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "var"
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(base_config(data_dir, 2526)))
    done = subprocess.run(
        [SMTPGATE, "credentials", "encrypt", "--config", str(config)],
        input="pa55word\n",
        capture_output=True,
        text=True,
        check=False,
        umask=0o002,
    )
    assert done.returncode == 0, done.stderr
    assert modes(tmp_path / "new") == {
        ".": "0700",
        "var": "0700",
        "var/keys": "0700",
        "var/keys/secret.key": "0600",
    }
