"""Reading a configuration document from YAML into a checked model.

Every problem, whether YAML syntax, schema or cross-field, comes back as a
:class:`~smtpgate.errors.ConfigError` whose problems name the field path
(``listeners[0].address``), never as a traceback. The message names the
object the field belongs to and quotes the rejected value (never a secret's):
``connection_profiles[0].relay: connection profile 'lab': 'sometimes' is not
one of 'none', 'full', ...``. A YAML syntax error keeps PyYAML's description
with its line and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from smtpgate.config.document import SECRET_FIELDS
from smtpgate.config.schema import GatewayConfig, convert_wildcard
from smtpgate.config.validate import name_objects, validate
from smtpgate.errors import ConfigError, FieldProblem

_SHOWN = 60  # a longer rejected value is cut short


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


def from_pydantic(error: ValidationError, document: Any = None) -> list[FieldProblem]:
    """The schema's problems with their field paths; ``document`` (the mapping that
    was checked) lets each message name the object it is about."""
    problems = []
    for item in error.errors(include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling in docs/configuration.md)"
        else:
            message = _with_value(item, message)
        problems.append(FieldProblem(field_path(tuple(item["loc"])), message))
    return name_objects(problems, document)


def _shown(value: str | int | float | bool) -> str:
    """A rejected scalar as it was written: YAML's true/false, a string quoted."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= _SHOWN else value[: _SHOWN - 3] + "...")
    return str(value)


def _with_value(item: ErrorDetails, message: str) -> str:
    """``Input should be ...`` with the value that was given instead of "Input"."""
    value = item.get("input")
    secret = any(part in SECRET_FIELDS for part in item["loc"] if isinstance(part, str))
    secret = secret or item["loc"][-1:] == ("store",)  # a URL may hold a password: shown masked
    if secret or item["type"] == "missing" or not isinstance(value, str | int | float | bool):
        return message
    shown = _shown(value)
    expected = (item.get("ctx") or {}).get("expected")
    if item["type"] == "literal_error" and expected:
        return f"{shown} is not one of {expected}"
    for subject in ("Input should ", "String should ", "Value should "):
        if message.startswith(subject):
            return f"{shown} should {message.removeprefix(subject)}"
    return message if shown in message or repr(value) in message else f"{shown}: {message}"


def parse_config(document: Any) -> GatewayConfig:
    """Check a parsed document (a mapping) and return the model."""
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([FieldProblem("", "the configuration must be a mapping")])
    try:
        config = GatewayConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(from_pydantic(exc, document)) from None
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
        raise ConfigError([FieldProblem("", yaml_problem(exc))]) from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's description of a syntax error, where it is, and what it was in:
    ``YAML syntax error at line 2, column 20: mapping values are not allowed here``."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"YAML syntax error: {exc}"
    where = _at(exc.problem_mark)
    problem = exc.problem or "not valid YAML"
    context = f" ({exc.context}{_at(exc.context_mark, ' that starts')})" if exc.context else ""
    return f"YAML syntax error{where}: {problem}{context}"


def _at(mark: yaml.Mark | None, lead: str = "") -> str:
    return f"{lead} at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def load_config(path: Path) -> GatewayConfig:
    """Read and check a YAML configuration file; relative paths are kept as written."""
    return parse_config(read_document(path))
