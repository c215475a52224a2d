"""The documentation names only what exists: every ``smtpgate`` command line in
README.md and docs/ uses options its parser accepts, and every log event
docs/operations.md lists is one the code logs."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from smtpgate.cli.main import _parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/operations.md", "docs/configuration.md", "docs/architecture.md"]
LEVELS = {"debug", "info", "warning", "error", "exception"}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _command_lines(text: str) -> list[str]:
    """``smtpgate …`` invocations, continuation lines joined, up to a comment."""
    text = re.sub(r"\\\n\s*", " ", text)  # shell continuations
    text = re.sub(r"\n\s+(?=\[--)", " ", text)  # wrapped [--option] lists
    return re.findall(r"smtpgate(?: [a-z][a-z-]*)+[^`\n#|]*", text)


def _unknown_options(line: str) -> list[str]:
    parser, words = _parser(), line.split()[1:]
    while words and words[0] in _subcommands(parser):
        parser = _subcommands(parser)[words.pop(0)]
    flags = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(words))
    return [flag for flag in flags if flag not in _options(parser)]


@pytest.mark.parametrize("name", DOCS)
def test_documented_command_lines_use_real_options(name: str) -> None:
    lines = _command_lines((ROOT / name).read_text())
    assert [(line, bad) for line in lines if (bad := _unknown_options(line))] == []


def _logged_events() -> set[str]:
    events = set()
    for path in (ROOT / "src" / "smtpgate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                events.add(str(node.args[0].value))
    return events


def _outside_parentheses(text: str) -> str:
    """What is left once every (parenthesised remark) is dropped: the event
    names; their fields and values are explained in parentheses."""
    while (shorter := re.sub(r"\([^()]*\)", "", text)) != text:
        text = shorter
    return text


def test_documented_log_events_are_logged() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Logs\n", 1)[1].split("\n## ", 1)[0]
    named = {
        " ".join(item.split())  # names wrapped over two lines
        for item in re.findall(r"`([^`]+)`", _outside_parentheses(section))
        if not item.startswith(("-", "smtpgate"))
    }
    assert "delivery" in named
    assert sorted(named - _logged_events()) == []
