"""A private OpenLDAP ``slapd`` for tests (Debian's ``slapd`` package, on loopback).

A ``slapd.conf`` in a temporary directory owned by ``nobody`` (slapd drops
root with ``-u``; the database directory must be its own), the core, cosine
and inetOrgPerson schemas, one MDB database for ``dc=example,dc=com`` loaded
with ``slapadd`` from the given LDIF, listening on 127.0.0.1 on a free port.
The directory's manager (``cn=admin,dc=example,dc=com``) binds with
:data:`PASSWORD`; anonymous users may not search. A missing binary fails the
test with the package to install (never a silent skip).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

USER, GROUP = "nobody", "nogroup"
SUFFIX = "dc=example,dc=com"
MANAGER = f"cn=admin,{SUFFIX}"
PASSWORD = "ldap-Secret-4711"

CONFIG = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {directory}/slapd.pid
access to * by dn.exact="{manager}" read by * none
database mdb
maxsize 10485760
suffix "{suffix}"
rootdn "{manager}"
rootpw {password}
directory {directory}/db
"""

BASE = f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people
"""


def person(uid: str, *mail: str) -> str:
    lines = [
        f"dn: uid={uid},ou=people,{SUFFIX}",
        "objectClass: inetOrgPerson",
        f"uid: {uid}",
        f"cn: {uid}",
        f"sn: {uid}",
        *(f"mail: {m}" for m in mail),
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Slapd:
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(f"/usr/sbin/{name}")
    if not found:
        pytest.fail(
            f"the LDAP tests need {name}: apt-get install slapd (.ci/run installs it)",
            pytrace=False,
        )
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait(port: int, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    _, err = process.communicate()
    raise RuntimeError(f"slapd did not start: {err.decode()[-2000:]}")


@contextmanager
def running_slapd(entries: str) -> Iterator[Slapd]:
    """A slapd serving ``BASE`` and ``entries`` (LDIF), stopped on exit."""
    slapd, slapadd = _binary("slapd"), _binary("slapadd")
    with tempfile.TemporaryDirectory(prefix="slapd-") as name:
        directory = Path(name)
        (directory / "db").mkdir()
        config = directory / "slapd.conf"
        config.write_text(
            CONFIG.format(directory=directory, manager=MANAGER, suffix=SUFFIX, password=PASSWORD)
        )
        ldif = directory / "data.ldif"
        ldif.write_text(BASE + "\n" + entries)
        shutil.chown(directory, USER, GROUP)
        for path in directory.rglob("*"):
            shutil.chown(path, USER, GROUP)
        subprocess.run(
            ["runuser", "-u", USER, "--", slapadd, "-q", "-f", str(config), "-l", str(ldif)],
            check=True,
            capture_output=True,
        )
        port = _free_port()
        process = subprocess.Popen(
            [
                slapd,
                "-d",
                "0",  # in the foreground, quiet
                "-f",
                str(config),
                "-h",
                f"ldap://127.0.0.1:{port}/",
                "-u",
                USER,
                "-g",
                GROUP,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait(port, process)
            yield Slapd(port, directory)
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
