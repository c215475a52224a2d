"""Packaging: the wheel holds every module and data file (the console's
templates and static files) and runs from where it is installed; the systemd
unit passes ``systemd-analyze verify``; requirements.lock pins every runtime
dependency of pyproject.toml."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from smtpgate.cli.args import DEFAULT_CONFIG

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "smtpgate"


def _package_files() -> set[str]:
    return {
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [built] = out.glob("smtpgate-*.whl")
    return built


def test_the_wheel_holds_every_module_template_and_static_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    missing = _package_files() - names
    assert missing == set()
    assert any(n.startswith("smtpgate/admin/console/templates/") for n in names)
    assert "smtpgate = smtpgate.cli.main:main" in scripts


def test_the_installed_wheel_runs(wheel: Path, tmp_path: Path) -> None:
    """Installed alone (its dependencies from this venv), the code that runs is
    the wheel's, templates included."""
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run(
        [*install, "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import smtpgate, pathlib; from smtpgate.cli.main import main; "
        "base = pathlib.Path(smtpgate.__file__).parent; "
        "print(base); print((base / 'admin/console/templates/base.html').is_file()); main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "--version"],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=False,
    )
    where, template, version = done.stdout.splitlines()
    assert Path(where).is_relative_to(target)
    assert template == "True"
    assert version.startswith("smtpgate ")


def test_the_systemd_unit() -> None:
    unit = (ROOT / "packaging" / "smtpgate.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["ExecStart"].endswith(f"smtpgate serve --config {DEFAULT_CONFIG}")
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ReadWritePaths"] == "/var/lib/smtpgate"
    assert "@system-service" in settings["SystemCallFilter"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    here = Path(sys.executable).with_name("smtpgate")  # the unit's binary must exist
    copy = ROOT / "build" / "unit-check" / "smtpgate.service"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(unit.replace("/usr/local/bin/smtpgate", str(here)))
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_the_lock_pins_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact version: {line}"
            locked[re.sub(r"[-_.]+", "-", name).lower()] = version
    wanted = {
        re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0]).lower()
        for spec in project["dependencies"]
    }
    assert wanted - set(locked) == set(), "make lock"
    assert "mypy" not in locked
    assert "pytest" not in locked
