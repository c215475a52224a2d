"""A private Dovecot POP3 server for tests (Debian's ``dovecot-pop3d``, on loopback).

A ``dovecot.conf`` of its own in a temporary directory (nothing of
``/etc/dovecot`` is read), POP3 on one free port (STLS offered, or not with
``stls=False``) and POP3S on another, the certificate from the tests' CA.
Users come from a ``passwd-file`` (plain passwords); their mail is a Maildir
owned by ``nobody`` (Dovecot never accesses mail as root). Messages are put
into a mailbox by writing Maildir files, and read back the same way, so a test
sees what the server holds without going through POP3. A missing binary fails
the test with the package to install (never a silent skip).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

USER, GROUP = "nobody", "nogroup"

CONFIG = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = {ssl}
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
first_valid_uid = 1
pop3_uidl_format = %08Xu%08Xv
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/home/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
{pop3s_listener}}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
service pop3-login {{
  chroot =
}}
"""


POP3S = """\
  inet_listener pop3s {{
    port = {port}
    ssl = yes
  }}
"""


@dataclass
class Dovecot:
    pop3: int  # plain POP3 (STLS offered unless started with stls=False)
    pop3s: int  # implicit TLS
    directory: Path
    process: subprocess.Popen[bytes]

    def maildir(self, user: str) -> Path:
        return self.directory / "home" / user / "Maildir"

    def deliver(self, user: str, message: bytes) -> None:
        """Put a message into ``user``'s mailbox, as a local delivery would."""
        maildir = self.maildir(user)
        name = f"{time.time():.6f}.{uuid.uuid4().hex}.test"
        partial = maildir / "tmp" / name
        partial.write_bytes(message.replace(b"\r\n", b"\n"))
        shutil.chown(partial, USER, GROUP)
        os.replace(partial, maildir / "new" / name)

    def count(self, user: str) -> int:
        """Messages left in ``user``'s mailbox."""
        maildir = self.maildir(user)
        return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())

    def log(self) -> str:
        path = self.directory / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _binary() -> str:
    found = shutil.which("dovecot") or shutil.which("/usr/sbin/dovecot")
    if not found or not Path("/usr/lib/dovecot/pop3").exists():
        pytest.fail(
            "the POP3 tests need Dovecot's POP3 server: apt-get install dovecot-pop3d "
            "(.ci/run installs it)",
            pytrace=False,
        )
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait(ports: list[int], process: subprocess.Popen[bytes], directory: Path) -> None:
    deadline = time.monotonic() + 15
    waiting = list(ports)
    while waiting and time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", waiting[0]), timeout=1):
                waiting.pop(0)
        except OSError:
            time.sleep(0.05)
    if waiting:
        process.kill()
        log = (directory / "dovecot.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"dovecot did not start: {log}")


@contextmanager
def running_dovecot(
    users: dict[str, str], cert: Path, key: Path, *, stls: bool = True
) -> Iterator[Dovecot]:
    """A Dovecot serving ``users`` (name → password), each with an empty Maildir."""
    dovecot = _binary()
    with tempfile.TemporaryDirectory(prefix="dovecot-") as name:
        directory = Path(name)
        directory.chmod(0o755)  # nobody reaches the mail homes below
        for sub in ("run", "state", "home"):
            (directory / sub).mkdir()
        (directory / "passwd").write_text(
            "".join(f"{user}:{{PLAIN}}{password}::::::\n" for user, password in users.items())
        )
        for user in users:
            for sub in ("cur", "new", "tmp"):
                (directory / "home" / user / "Maildir" / sub).mkdir(parents=True)
            for path in [directory / "home" / user, *(directory / "home" / user).rglob("*")]:
                shutil.chown(path, USER, GROUP)
        ports = [_free_port(), _free_port()]
        config = directory / "dovecot.conf"
        config.write_text(
            CONFIG.format(
                d=directory,
                ssl="yes" if stls else "no",
                cert=cert,
                key=key,
                uid=pwd.getpwnam(USER).pw_uid,
                gid=grp.getgrnam(GROUP).gr_gid,
                pop3=ports[0],
                pop3s_listener=POP3S.format(port=ports[1]) if stls else "",
            )
        )
        process = subprocess.Popen(
            [dovecot, "-F", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            _wait(ports if stls else ports[:1], process, directory)
            yield Dovecot(ports[0], ports[1], directory, process)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
