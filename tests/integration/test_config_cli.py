"""The configuration commands against the local store, as an administrator types
them: real ``smtpgate`` processes, a real store in a temporary data directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMTPGATE, base_config


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    document = base_config(tmp_path / "var", 2526)
    document["connection_profiles"] = [{"name": "apps", "client_hosts": ["127.0.0.2"]}]
    path.write_text(yaml.safe_dump(document))
    # what `smtpgate serve` does first: the file becomes revision 1
    cli(path, "config", "import", str(path))
    cli(path, "config", "apply", "--comment", "from the file")
    return path


def cli(config: Path, *argv: str, code: int = 0) -> str:
    done = subprocess.run(
        [SMTPGATE, *argv, "--config", str(config)], capture_output=True, text=True, check=False
    )
    assert done.returncode == code, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_edit_diff_apply_history_rollback(config_file: Path) -> None:
    out = cli(config_file, "profile", "set", "apps", "relay=full", "client_hosts+=10.0.0.0/8")
    assert "draft: connection profile apps changed" in out
    cli(config_file, "profile", "add", "partner", "relay=restricted-external")
    cli(config_file, "domain", "add", "Example.NET")
    cli(config_file, "config", "set", "spoof_detection", "false")
    cli(config_file, "config", "set", "limits", "max_recipients=50")
    diff = cli(config_file, "config", "diff")
    assert diff.splitlines() == [
        "hosted domains: added example.net",
        "limits: max_recipients 1000 → 50",
        "connection profile apps: client_hosts: added 10.0.0.0/8",
        "connection profile apps: relay none → full",
        "connection profile partner: added",
        "spoof detection true → false",
        "restart required for: limits.max_recipients",
    ]
    assert cli(config_file, "config", "validate").strip() == "the draft is valid"
    applied = cli(config_file, "config", "apply", "--comment", "open up")
    assert "applied as revision 2" in applied
    assert "restart required" in applied
    history = json.loads(cli(config_file, "config", "history", "--json"))
    assert [(h["revision"], h["comment"]) for h in history] == [
        (2, "open up"),
        (1, "from the file"),
    ]
    assert cli(config_file, "config", "diff").startswith("no changes")
    profiles = json.loads(cli(config_file, "profile", "list", "--json"))
    assert [p["name"] for p in profiles] == ["apps", "partner"]

    cli(config_file, "profile", "delete", "partner")
    out = cli(config_file, "config", "rollback", "1", code=1)
    assert "a draft is staged already" in out
    cli(config_file, "config", "rollback", "1", "--force")
    cli(config_file, "config", "apply")
    shown = yaml.safe_load(cli(config_file, "config", "show", "--applied"))
    assert shown["connection_profiles"][0]["relay"] == "none"
    audit = cli(config_file, "config", "audit")
    assert "apply" in audit
    assert "cli:" in audit


def test_invalid_edits_name_the_field_and_change_nothing(config_file: Path) -> None:
    out = cli(config_file, "profile", "set", "apps", "client_hosts+=10.0.0.1/8", code=1)
    assert "connection_profiles[0].client_hosts[1]" in out
    out = cli(config_file, "profile", "set", "nobody", "relay=full", code=1)
    assert "no connection profile named 'nobody'" in out
    out = cli(config_file, "listener", "add", "mx", "address=127.0.0.1:1", code=1)
    assert "exists already" in out
    out = cli(config_file, "config", "set", "gateway", "data_dir=/elsewhere", code=1)
    assert "gateway.data_dir" in out
    out = cli(config_file, "config", "set", "tls", "relay", code=1)
    assert "FIELD=VALUE" in out
    assert cli(config_file, "config", "diff").startswith("no changes")
    assert "Traceback" not in out


def test_validate_catches_what_only_opening_files_shows(config_file: Path) -> None:
    cli(config_file, "certificate", "add", "gw", "cert=/nonexistent/gw.pem")
    out = cli(config_file, "config", "validate", code=1)
    assert "certificates[0]" in out
    out = cli(config_file, "config", "apply", code=1)
    assert "certificates[0]" in out
    cli(config_file, "config", "discard")
    assert cli(config_file, "config", "diff").startswith("no changes")


def test_round_trip_export_import_diff_is_empty(config_file: Path, tmp_path: Path) -> None:
    cli(config_file, "profile", "set", "apps", "relay=restricted-internal", "notes=ops")
    cli(config_file, "config", "apply")
    exported = tmp_path / "exported.yaml"
    exported.write_text(cli(config_file, "config", "export"))
    assert "max_recipients" not in exported.read_text()  # defaults are left out
    cli(config_file, "config", "import", str(exported))
    assert cli(config_file, "config", "diff").startswith("no changes")


def test_tokens(config_file: Path) -> None:
    token = cli(config_file, "admin", "token", "create", "ops").splitlines()[0]
    assert token.startswith("sgt_")
    assert "ops" in cli(config_file, "admin", "token", "list")
    assert token not in cli(config_file, "admin", "token", "list")
    cli(config_file, "admin", "token", "create", "ops", code=1)
    cli(config_file, "admin", "token", "revoke", "ops")
    assert "ops" not in cli(config_file, "admin", "token", "list")
