"""Reading a configuration document from YAML into a checked model.

Every problem, whether YAML syntax, schema or cross-field, comes back as a
:class:`~smtpgate.errors.ConfigError` whose problems name the field path
(``listeners[0].address``), never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from smtpgate.config.schema import GatewayConfig, convert_wildcard
from smtpgate.config.validate import validate
from smtpgate.errors import ConfigError, FieldProblem


def field_path(location: tuple[int | str, ...]) -> str:
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "literal[", "union[")):
            continue
        else:
            out += f".{part}" if out else part
    return out


def from_pydantic(error: ValidationError) -> list[FieldProblem]:
    problems = []
    for item in error.errors(include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling in docs/configuration.md)"
        problems.append(FieldProblem(field_path(tuple(item["loc"])), message))
    return problems


def parse_config(document: Any) -> GatewayConfig:
    """Check a parsed document (a mapping) and return the model."""
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([FieldProblem("", "the configuration must be a mapping")])
    try:
        config = GatewayConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(from_pydantic(exc)) from None
    problems = validate(config)
    if problems:
        raise ConfigError(problems)
    return config


def notices(document: Any) -> list[FieldProblem]:
    """Things the loader changed on the way in (legacy wildcards become CIDR)."""
    found: list[FieldProblem] = []
    profiles = document.get("connection_profiles") if isinstance(document, dict) else None
    for i, profile in enumerate(profiles if isinstance(profiles, list) else []):
        hosts = profile.get("client_hosts") if isinstance(profile, dict) else None
        for j, entry in enumerate(hosts if isinstance(hosts, list) else []):
            converted = convert_wildcard(entry) if isinstance(entry, str) else None
            if converted is not None:
                found.append(
                    FieldProblem(
                        f"connection_profiles[{i}].client_hosts[{j}]",
                        f"legacy wildcard {entry} converted to {converted}",
                    )
                )
    return found


def read_document(path: Path) -> Any:
    """The YAML document in ``path``, or a ConfigError saying why it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([FieldProblem("", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([FieldProblem("", f"YAML syntax error{where}")]) from None


def load_config(path: Path) -> GatewayConfig:
    """Read and check a YAML configuration file; relative paths are kept as written."""
    return parse_config(read_document(path))
