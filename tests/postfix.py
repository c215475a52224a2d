"""A private Postfix instance for tests and benchmarks (real Postfix, on loopback).

Runs ``postfix -c DIR start`` with its own main.cf/master.cf (no chroot),
queue and data directories, optional SASL users (sasldb via saslpasswd2) and
TLS certificate, relaying everything to ``relayhost``. Needs root (Postfix's
master runs as root) and Debian's postfix, sasl2-bin and libsasl2-modules,
which ``.ci/run`` installs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
tlsmgr    unix  - - n 1000? 1 tlsmgr
"""


def instance_directory() -> Path:
    """A directory the postfix user can reach (pytest's tmp_path parents are 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="smtpgate-postfix-"))
    directory.chmod(0o755)
    return directory


@dataclass
class Postfix:
    directory: Path
    port: int
    relayhost: tuple[str, int]
    users: dict[str, str] = field(default_factory=dict)  # SASL user → password
    cert: Path | None = None
    key: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    ca_file: Path | None = None  # with require_client_cert: the CA client certificates come from
    require_client_cert: bool = False
    _process: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.directory / "conf"

    def start(self) -> None:
        if shutil.which("postfix") is None or os.geteuid() != 0:
            raise RuntimeError("a private Postfix needs root and Debian's postfix package")
        default = Path("/etc/postfix/main.cf")
        if not default.exists():  # "No configuration" installs leave none; postfix needs one
            default.write_text("compatibility_level = 3.6\n")
        for sub in ("conf", "queue", "data"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.directory / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        if self.cert and self.key:  # smtpd reads them as root, from a place it can reach
            self.cert = Path(shutil.copy(self.cert, self.conf / "cert.pem"))
            self.key = Path(shutil.copy(self.key, self.conf / "key.pem"))
        if self.ca_file:
            self.ca_file = Path(shutil.copy(self.ca_file, self.conf / "ca.pem"))
        (self.conf / "main.cf").write_text(self._main_cf())
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        if self.users:
            self._sasl()
        # start-fg keeps the master as our child: no syslog needed, and it dies with us.
        self._process = subprocess.Popen(
            ["postfix", "-c", str(self.conf), "start-fg"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait()

    def _main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.directory / "queue"),
            "data_directory": str(self.directory / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[{self.relayhost[0]}]:{self.relayhost[1]}",
            "maillog_file": str(self.directory / "maillog"),
            "maillog_file_prefixes": str(self.directory),  # default allows only /var
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
        }
        if self.users:
            settings |= {
                "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "cyrus",
                "smtpd_sasl_path": "smtpd",
                "cyrus_sasl_config_path": str(self.conf / "sasl"),
                "smtpd_sasl_security_options": "noanonymous",
            }
        if self.cert and self.key:
            settings |= {
                "smtpd_tls_security_level": "may",
                "smtpd_tls_cert_file": str(self.cert),
                "smtpd_tls_key_file": str(self.key),
            }
        if self.require_client_cert and self.ca_file:
            settings |= {
                "smtpd_tls_security_level": "encrypt",
                "smtpd_tls_ask_ccert": "yes",
                "smtpd_tls_req_ccert": "yes",
                "smtpd_tls_CAfile": str(self.ca_file),
            }
        settings |= self.extra
        return "".join(f"{k} = {v}\n" for k, v in settings.items())

    def _sasl(self) -> None:
        sasl = self.conf / "sasl"
        sasl.mkdir(exist_ok=True)
        db = self.directory / "sasldb2"
        (sasl / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {db}\n"
            "mech_list: PLAIN LOGIN\n"
        )
        for user, password in self.users.items():
            subprocess.run(
                ["saslpasswd2", "-p", "-c", "-f", str(db), user],
                input=password.encode(),
                check=True,
            )
        db.chmod(0o644)  # smtpd reads it as the postfix user

    def _wait(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.1)
            else:
                return
        raise RuntimeError(f"Postfix did not start; see {self.directory / 'maillog'}")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False, capture_output=True)
        if self._process is not None:
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        path = self.directory / "maillog"
        return path.read_text() if path.exists() else ""
