"""``smtpgate cluster key export|import`` as an administrator types them: real
``smtpgate`` processes copying the secret key from one node's data directory
to another's, and ``cluster status`` comparing it with the cluster's."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet

from smtpgate.admin.keys import check_cluster_key
from smtpgate.cli.args import load_file
from smtpgate.config.schema import GatewaySettings
from smtpgate.config.secret import decrypt, fingerprint, key_path, load_key, read_key
from smtpgate.config.store import ConfigStore
from tests.conftest import SMTPGATE, base_config


def node(tmp_path: Path, name: str, store: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    document = base_config(tmp_path / name, 2526)
    if store:
        document["gateway"]["store"] = store
    path.write_text(yaml.safe_dump(document))
    return path


def cli(
    config: Path, *argv: str, code: int = 0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [SMTPGATE, *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        input=stdin,
    )
    assert done.returncode == code, done.stdout + done.stderr
    return done


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_export_to_a_file_and_import_it_on_a_peer(tmp_path: Path) -> None:
    first, second = node(tmp_path, "a"), node(tmp_path, "b")
    token = cli(first, "credentials", "encrypt", stdin="s3cret\n").stdout.strip()
    out = tmp_path / "exported.key"
    done = cli(first, "cluster", "key", "export", "--out", str(out))
    key = read_key(tmp_path / "a")
    assert key is not None
    assert f"fingerprint {fingerprint(key)}" in done.stderr
    assert key.decode() not in done.stdout + done.stderr
    assert mode(out) == 0o600
    assert out.read_bytes() == key + b"\n"
    refused = cli(first, "cluster", "key", "export", "--out", str(out), code=1)
    assert f"{out} exists: not overwritten" in refused.stderr

    installed = cli(second, "cluster", "key", "import", str(out))
    path = key_path(tmp_path / "b")
    assert f"secret key installed in {path} (fingerprint {fingerprint(key)})" in installed.stdout
    assert (mode(path), mode(path.parent), mode(tmp_path / "b")) == (0o600, 0o700, 0o700)
    assert read_key(tmp_path / "b") == key
    clear = decrypt(load_key(tmp_path / "b", create=False), token, "x")
    assert clear.get_secret_value() == "s3cret"
    again = cli(second, "cluster", "key", "import", str(out))
    assert "this node has this key already" in again.stdout


def test_export_to_standard_output_pipes_into_import(tmp_path: Path) -> None:
    first, second = node(tmp_path, "a"), node(tmp_path, "b")
    missing = cli(first, "cluster", "key", "export", code=1)
    assert "this node has no secret key" in missing.stderr
    cli(first, "credentials", "encrypt", stdin="s3cret\n")
    exported = cli(first, "cluster", "key", "export").stdout
    assert exported == (read_key(tmp_path / "a") or b"").decode() + "\n"
    cli(second, "cluster", "key", "import", "-", stdin=exported)
    assert read_key(tmp_path / "b") == read_key(tmp_path / "a")


@pytest.mark.parametrize("text", ["", "hunter2\n", "enc:v1:gAAAAABk\n", "x" * 44])
def test_import_refuses_what_is_not_a_key(tmp_path: Path, text: str) -> None:
    second = node(tmp_path, "b")
    given = tmp_path / "given.key"
    given.write_text(text)
    refused = cli(second, "cluster", "key", "import", str(given), code=1)
    assert f"{given} is not a smtpgate secret key (a Fernet key" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not key_path(tmp_path / "b").exists()
    piped = cli(second, "cluster", "key", "import", "-", stdin=text, code=1)
    assert "standard input is not a smtpgate secret key" in piped.stderr


def test_import_replaces_a_different_key_only_with_force(tmp_path: Path) -> None:
    second = node(tmp_path, "b")
    cli(second, "credentials", "encrypt", stdin="s3cret\n")
    own = read_key(tmp_path / "b")
    assert own is not None
    given = tmp_path / "given.key"
    key = Fernet.generate_key()
    given.write_bytes(key + b"\n")
    refused = cli(second, "cluster", "key", "import", str(given), code=1)
    assert (
        f"this node has a different secret key ({key_path(tmp_path / 'b')}, "
        f"fingerprint {fingerprint(own)})"
    ) in refused.stderr
    assert "--force replaces it" in refused.stderr
    assert read_key(tmp_path / "b") == own
    cli(second, "cluster", "key", "import", str(given), "--force")
    assert read_key(tmp_path / "b") == key
    assert mode(key_path(tmp_path / "b")) == 0o600


def test_import_compares_with_the_clusters_key_and_status_shows_it(tmp_path: Path) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = node(tmp_path, "a", shared), node(tmp_path, "b", shared)
    cli(first, "credentials", "encrypt", stdin="s3cret\n")
    store = ConfigStore.open_configured(yaml_gateway(first))  # as serve opens it
    try:
        check_cluster_key(store, tmp_path / "a")  # what serve does first
    finally:
        store.close()
    cluster = fingerprint(read_key(tmp_path / "a") or b"")
    other = tmp_path / "other.key"
    other.write_bytes(Fernet.generate_key() + b"\n")
    refused = cli(second, "cluster", "key", "import", str(other), code=1)
    assert f"is not the cluster's (fingerprint {cluster}" in refused.stderr
    assert not key_path(tmp_path / "b").exists()

    status = cli(first, "cluster", "status").stdout.splitlines()
    assert status[-1] == f"secret key: fingerprint {cluster} (this node: same)"
    forced = cli(second, "cluster", "key", "import", str(other), "--force")
    assert "`smtpgate serve` will refuse to start with this one" in forced.stderr
    ConfigStore.open_configured(yaml_gateway(second)).close()  # serve notes the store
    status = cli(second, "cluster", "status").stdout.splitlines()
    mine = fingerprint(read_key(tmp_path / "b") or b"")
    assert status[-1] == (
        f"secret key: fingerprint {cluster} (this node: different, fingerprint {mine})"
    )


def yaml_gateway(config: Path) -> GatewaySettings:
    return load_file(config).gateway
