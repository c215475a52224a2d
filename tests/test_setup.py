"""The set-up the README promises: it names every Debian package ``.ci/run``
installs, and ``make test`` says in one line what is missing before it runs
anything (``tests/require.sh``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRE = ROOT / "tests" / "require.sh"


def ci_packages() -> list[str]:
    match = re.search(r"^packages=\(([^)]*)\)", (ROOT / ".ci" / "run").read_text(), re.M)
    assert match, ".ci/run has no packages=(...) line"
    return match.group(1).split()


def test_the_readme_names_every_package_ci_installs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [p for p in ci_packages() if f"`{p}`" not in readme] == []


def test_the_requirement_check_knows_every_package_the_tests_need() -> None:
    script = REQUIRE.read_text()
    assert [p for p in ci_packages() if p != "python3-venv" and f" {p}" not in script] == []


def test_the_requirement_check_says_what_is_missing_in_one_line(tmp_path: Path) -> None:
    fake_id = tmp_path / "id"
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)
    done = subprocess.run(
        ["/bin/sh", str(REQUIRE)],
        env={"PATH": str(tmp_path)},  # no swaks, postfix, perl, ...; not root
        capture_output=True,
        text=True,
        check=False,
    )
    sasl = "" if list(Path("/usr/lib").glob("*/sasl2/libplain.so")) else " libsasl2-modules"
    # found by path, not by PATH: listed only where this machine lacks them
    postgres = "" if list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) else " postgresql"
    font = (
        ""
        if Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists()
        else " fonts-dejavu-core"
    )
    clamd = "" if Path("/usr/sbin/clamd").exists() else " clamav-daemon"
    dovecot = "" if Path("/usr/lib/dovecot/pop3").exists() else " dovecot-pop3d"
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "make test needs root (the tests run a private Postfix) and: swaks libnet-ssleay-perl "
        f"libio-socket-ssl-perl postfix sasl2-bin{sasl} testssl.sh{postgres} chromium{font} "
        f"rspamd slapd{clamd}{dovecot}; sudo .ci/run installs them and runs the tests"
    ]
