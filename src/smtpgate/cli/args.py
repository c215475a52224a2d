"""Command-line values checked where they are typed, and the file errors.

A mistake on the command line is a usage error: argparse reports it with the
option and the value (``argument --older-than: '2x' is not an age ...``) and
exit code 2, before anything is opened. A problem in a configuration file
named on the command line is a :class:`FileConfigError`, reported with the
file's name; other configuration problems (an edit that would make the draft
invalid) never blame the file.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from smtpgate.config.load import load_config, read_document
from smtpgate.config.schema import GatewayConfig, parse_duration, parse_listen_address
from smtpgate.errors import ConfigError

QUEUE_DIR = "queue"
DEFAULT_CONFIG = Path("/etc/smtpgate/gateway.yaml")  # as /etc/postfix/main.cf
CONFIG_VARIABLE = "SMTPGATE_CONFIG"


class NoDefaultConfigError(Exception):
    """No ``--config`` (nor ``--data-dir``/``--api``) given, and the default file is missing."""


def default_config() -> Path:
    """``$SMTPGATE_CONFIG``, else ``/etc/smtpgate/gateway.yaml``: the file a command
    given no ``--config`` (nor ``--data-dir``, ``--api``) works on."""
    return Path(os.environ.get(CONFIG_VARIABLE) or DEFAULT_CONFIG)


def fill_default_config(args: argparse.Namespace) -> None:
    """Give ``args.config`` its default when the command takes ``--config`` and was
    told no other place to work on; NoDefaultConfigError when that file does not exist."""
    if not hasattr(args, "config") or args.config is not None:
        return
    if getattr(args, "data_dir", None) is not None or getattr(args, "api", None):
        return
    path = default_config()
    if not path.is_file():
        raise NoDefaultConfigError(
            f"no configuration file: {path} does not exist (the default is "
            f"${CONFIG_VARIABLE}, else {DEFAULT_CONFIG}; or give --config FILE)"
        )
    args.config = path


class FileConfigError(ConfigError):
    """The configuration file ``path`` is invalid (or cannot be read)."""

    def __init__(self, path: Path, error: ConfigError) -> None:
        self.path = path
        super().__init__(error.problems)


def read_file(path: Path) -> Any:
    """The YAML document in ``path``; problems name the file."""
    try:
        return read_document(path)
    except ConfigError as exc:
        raise FileConfigError(path, exc) from None


def load_file(path: Path) -> GatewayConfig:
    """The checked configuration in ``path``; problems name the file."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise FileConfigError(path, exc) from None


# -- argparse types: each returns the value or raises ArgumentTypeError ---------------


def data_dir(value: str) -> Path:
    """An existing gateway data directory. Only ``smtpgate serve`` (and commands
    given ``--config``, whose file names the directory) may create one, so a
    mistyped ``--data-dir`` never leaves an empty store behind."""
    from smtpgate.config.store import store_exists  # noqa: PLC0415 - SQLAlchemy only when used

    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {value}")
    if not (store_exists(path) or (path / QUEUE_DIR).is_dir()):
        raise argparse.ArgumentTypeError(
            f"{value} is not a gateway data directory (no config.db, no queue); "
            "`smtpgate serve` makes one"
        )
    return path


def age(value: str) -> str:
    """An age such as ``30m``, ``2h`` or ``1d``, kept as typed (the API takes it so)."""
    try:
        parse_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an age from 0 to 3650 days, like 30m, 2h or 1d"
        ) from None
    return value


def listen_address(value: str) -> str:
    """``HOST:PORT`` to listen on (``[ADDR]:PORT`` for IPv6)."""
    try:
        parse_listen_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def api_url(value: str) -> str:
    """``http(s)://HOST[:PORT]``, the address of a gateway's REST API."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} is not an API URL like http://127.0.0.1:8025")
    after_host = parts.netloc.rpartition("@")[2].rpartition("]")[2]  # past an IPv6 literal
    _, colon, port = after_host.rpartition(":")
    if colon and not (port.isascii() and port.isdigit()):
        raise argparse.ArgumentTypeError(f"{value!r}: port {port!r} is not a number")
    if colon and not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"port {int(port)} is out of range (1–65535)")  # noqa: RUF001
    return value


def ip_address(value: str) -> str:
    """An IPv4 or IPv6 address, normalised (``policy explain --client-ip``)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IPv4 or IPv6 address") from None
