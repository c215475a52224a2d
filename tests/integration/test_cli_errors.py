"""What an administrator sees when the command line is wrong, or when the
reader of the output goes away: real ``smtpgate`` processes over a real store,
asserting the exact sentence and exit code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from smtpgate.admin import edit
from smtpgate.admin.services import ConfigService
from smtpgate.config.store import ConfigStore
from tests.conftest import SMTPGATE, base_config

PASSWORD = "correct horse battery staple"


def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    done = subprocess.run(
        [SMTPGATE, *argv], input=stdin, capture_output=True, text=True, check=False
    )
    return done.returncode, done.stdout, done.stderr


def ok(*argv: str, stdin: str = "") -> str:
    code, out, err = run(*argv, stdin=stdin)
    assert code == 0, out + err
    return out


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A gateway file whose store has it as revision 1 (what `serve` does first)."""
    path = tmp_path / "gateway.yaml"
    document = base_config(tmp_path / "var", 2526)
    document["connection_profiles"] = [{"name": "apps", "client_hosts": ["127.0.0.2"]}]
    path.write_text(yaml.safe_dump(document))
    ok("config", "import", str(path), "--config", str(path))
    ok("config", "apply", "--config", str(path))
    return path


# -- 11: a reader that stops early ----------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["config", "show"],
        ["policy", "explain", "--client-ip", "127.0.0.1", "--recipient", "a@example.com"],
    ],
)
def test_output_cut_short_by_its_reader_ends_quietly(config_file: Path, argv: list[str]) -> None:
    process = subprocess.Popen(
        [SMTPGATE, *argv, "--config", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # `| head` that has read enough, before anything was written
    errors = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141  # as for a program killed by SIGPIPE
    assert errors == ""


# -- 12: --data-dir names an existing data directory ---------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["config", "audit"],
        ["profile", "list"],
        ["queue", "list"],
        ["admin", "token", "list"],
        ["credentials", "encrypt"],
        ["admin", "api", "--listen", "127.0.0.1:0"],
    ],
)
def test_a_data_dir_that_does_not_exist_is_refused(tmp_path: Path, argv: list[str]) -> None:
    missing = tmp_path / "typo"
    code, out, err = run(*argv, "--data-dir", str(missing), stdin=PASSWORD)
    assert code == 2
    assert out == ""
    command = " ".join(argv[:3] if argv[0] == "admin" and argv[1] == "token" else argv[:2])
    assert err.splitlines()[-1] == (
        f"smtpgate {command}: error: argument --data-dir: no such directory: {missing}"
    )
    assert not missing.exists()


def test_a_directory_that_is_not_a_data_dir_is_refused(tmp_path: Path) -> None:
    code, _, err = run("config", "audit", "--data-dir", str(tmp_path))
    assert code == 2
    assert err.splitlines()[-1] == (
        f"smtpgate config audit: error: argument --data-dir: {tmp_path} is not a gateway "
        "data directory (no config.db, no queue); `smtpgate serve` makes one"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_existing_data_dir_is_used(config_file: Path) -> None:
    data_dir = config_file.parent / "var"
    audit = json.loads(ok("config", "audit", "--json", "--data-dir", str(data_dir)))
    assert [entry["action"] for entry in audit] == ["apply", "draft.edit"]


# -- 13: bad option values are usage errors naming the option and the value -----------


def test_a_bad_age_is_a_usage_error_not_a_bad_file(config_file: Path) -> None:
    code, out, err = run("queue", "list", "--older-than", "2x", "--config", str(config_file))
    assert code == 2
    assert out == ""
    assert err.splitlines()[-1] == (
        "smtpgate queue list: error: argument --older-than: '2x' is not an age "
        "from 0 to 3650 days, like 30m, 2h or 1d"
    )
    assert str(config_file) not in err
    assert ok("queue", "list", "--older-than", "2h", "--config", str(config_file)).endswith(
        "-- 0 message(s)\n"
    )


@pytest.mark.parametrize(
    ("argv", "command", "option"),
    [
        (["sink", "--listen", "127.0.0.1:99999"], "sink", "--listen"),
        (
            ["admin", "api", "--data-dir", "{var}", "--listen", "127.0.0.1:99999"],
            "admin api",
            "--listen",
        ),
        (["config", "show", "--api", "http://127.0.0.1:99999"], "config show", "--api"),
        (["queue", "list", "--api", "http://[::1]:99999"], "queue list", "--api"),
    ],
)
def test_a_port_out_of_range_says_so(
    config_file: Path, argv: list[str], command: str, option: str
) -> None:
    var = str(config_file.parent / "var")
    code, out, err = run(*[a.format(var=var) for a in argv])
    assert code == 2
    assert out == ""
    assert err.splitlines()[-1] == (
        f"smtpgate {command}: error: argument {option}: port 99999 is out of range (1–65535)"  # noqa: RUF001
    )


def test_an_api_url_without_scheme_is_a_usage_error() -> None:
    code, _, err = run("config", "show", "--api", "127.0.0.1:8025")
    assert code == 2
    assert err.splitlines()[-1] == (
        "smtpgate config show: error: argument --api: '127.0.0.1:8025' is not an API URL "
        "like http://127.0.0.1:8025"
    )


def test_a_port_out_of_range_in_the_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    document = base_config(tmp_path / "var", 2526)
    document["listeners"][0]["address"] = "127.0.0.1:99999"
    path.write_text(yaml.safe_dump(document))
    code, _, err = run("config", "check", "--config", str(path))
    assert code == 1
    assert err.splitlines() == [
        f"{path}: configuration is invalid:",
        "  - listeners[0].address: listener 'mx': '127.0.0.1:99999': "
        "port 99999 is out of range (1–65535)",  # noqa: RUF001
    ]


def test_an_invalid_edit_does_not_blame_the_file(config_file: Path) -> None:
    code, _, err = run(
        "profile", "set", "apps", "client_hosts+=10.0.0.1/8", "--config", str(config_file)
    )
    assert code == 1
    assert err.splitlines()[0] == "smtpgate: invalid configuration:"
    assert err.splitlines()[1].startswith("  - connection_profiles[0].client_hosts[1]: ")
    assert str(config_file) not in err


# -- 15: the audit log says what changed ---------------------------------------------


def test_the_audit_log_records_each_changed_field(config_file: Path) -> None:
    where = ["--config", str(config_file)]
    ok("profile", "set", "apps", "relay=full", *where)
    ok("domain", "add", "example.net", *where)
    audit = json.loads(ok("config", "audit", "--json", *where))
    assert [(e["action"], e["detail"]) for e in audit[:2]] == [
        ("draft.edit", "hosted domains: added example.net"),
        ("draft.edit", "connection profile apps: relay none → full"),
    ]
    assert audit[0]["actor"].startswith("cli:")
    text = ok("config", "audit", *where)
    assert text.splitlines()[1].endswith("connection profile apps: relay none → full")


def test_the_audit_log_never_shows_a_secret(config_file: Path) -> None:
    where = ["--config", str(config_file)]
    token = ok("credentials", "encrypt", *where, stdin=PASSWORD).strip()
    assert token.startswith("enc:v1:")
    ok(
        "connector",
        "set",
        "to-sink",
        "deliver.smarthost.username=relay",
        f"deliver.smarthost.password={token}",
        *where,
    )
    audit = json.loads(ok("config", "audit", "--json", *where))
    assert audit[0]["detail"] == (
        "send connector to-sink: deliver.smarthost.username (none) → relay; "
        "send connector to-sink: deliver.smarthost.password changed (secret not shown)"
    )
    shown = ok("config", "audit", *where) + json.dumps(audit)
    assert PASSWORD not in shown
    assert token not in shown


def test_a_whole_document_put_is_audited_field_by_field(config_file: Path) -> None:
    """The API's PUT /config/draft replaces the whole draft; the audit log still
    names the fields that changed (the same service call, over the same store)."""
    data_dir = config_file.parent / "var"
    service = ConfigService(ConfigStore.open(data_dir), data_dir)
    try:
        document = service.working()[0]
        item = edit.apply_edits(edit.get_item(document, "connection_profiles", "apps"), [])
        changed = edit.replace_item(
            document, "connection_profiles", "apps", {**item, "relay": "blocked"}
        )
        service.edit(lambda _old: changed, "token:ops", "whole document")
        entry = service.store.audit_log()[0]
    finally:
        service.store.close()
    assert (entry.actor, entry.action, entry.detail) == (
        "token:ops",
        "draft.edit",
        "connection profile apps: relay none → blocked",
    )


def test_a_rollback_says_what_it_was_and_what_it_changes(config_file: Path) -> None:
    where = ["--config", str(config_file)]
    ok("profile", "set", "apps", "relay=full", *where)
    ok("config", "apply", *where)
    ok("config", "rollback", "1", *where)
    audit = json.loads(ok("config", "audit", "--json", *where))
    assert audit[0]["detail"] == (
        "rollback to revision 1: connection profile apps: relay full → none"
    )


def test_credentials_sent_from_the_cli_are_audited(config_file: Path) -> None:
    where = ["--config", str(config_file)]
    token = ok("credentials", "encrypt", *where, stdin=PASSWORD).strip()
    ok(
        "profile",
        "set",
        "apps",
        "smtp_auth.enabled=true",
        f"smtp_auth.credentials=[{{username: app, password: {token}}}]",
        *where,
    )
    ok("config", "apply", "--no-wait", *where)
    assert ok("credentials", "send", "apps", *where).endswith("for postmaster@example.com\n")
    audit = json.loads(ok("config", "audit", "--json", *where))
    assert (audit[0]["action"], audit[0]["detail"]) == (
        "credentials.send",
        "apps → postmaster@example.com",
    )
    assert audit[0]["actor"].startswith("cli:")
    assert PASSWORD not in json.dumps(audit)


def test_a_broken_queue_database_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`queue list` on a damaged queue.db printed sqlite3's traceback."""
    config = tmp_path / "gateway.yaml"
    data_dir = tmp_path / "var"
    config.write_text(yaml.safe_dump(base_config(data_dir, 2526)))
    queue = data_dir / "queue"
    queue.mkdir(parents=True)
    (queue / "queue.db").write_bytes(b"this is not a database\n" * 200)
    code, out, err = run("queue", "list", "--config", str(config))
    assert code == 1
    assert err == "smtpgate: the queue cannot be read or written: file is not a database\n"
    assert "Traceback" not in out + err
