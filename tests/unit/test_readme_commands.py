"""The README and the CLI say the same thing: every `meterline` command and option the README
names exists (and answers --help), and every command the CLI has is in the README's table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from meterline.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CLI: Any = typer.main.get_command(app)


def _table_commands() -> list[str]:
    """The first column of the README's command table, each code span one command."""
    section = README.split("## The `meterline` command", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first_column = line.split(" | ", 1)[0]
            for span in re.findall(r"`([^`]+)`", first_column):
                commands.append(span if span.startswith("meterline") else f"meterline {span}")
    return commands


def _prose_commands() -> list[str]:
    """Every other code span, and every line of a code block, that starts with `meterline `."""
    spans = re.findall(r"`(meterline(?: [^`]*)?)`", README)
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return spans + [line.split("#")[0].strip() for line in lines if line.startswith("meterline ")]


NAMED = sorted(set(_table_commands() + _prose_commands()))


@dataclass(frozen=True)
class Named:
    path: tuple[str, ...]
    options: tuple[str, ...]
    unknown: str | None = None  # a word where a group expects one of its commands


def _resolve(text: str) -> list[Named]:
    """The command paths (alternatives like `list/add` expanded) and the options `text` names."""
    tokens = [t.strip("[]") for t in text.split()[1:]]
    paths: list[tuple[tuple[str, ...], Any]] = [((), CLI)]
    options: list[str] = []
    descending = True
    unknown = None
    for token in tokens:
        if token.startswith("--"):
            options.extend(part.split("=")[0] for part in token.split("/"))
            descending = False
            continue
        if not descending or token == "...":
            continue
        grown = []
        for path, command in paths:
            children = getattr(command, "commands", {})
            names = token.split("/")
            if all(name in children for name in names):
                grown.extend(((*path, name), children[name]) for name in names)
        if grown:
            paths = grown
        else:
            # An argument (ORG, FILE, T1) of a command; after a group it can only be a typo.
            if any(hasattr(command, "commands") for _, command in paths):
                unknown = token
            descending = False
    return [Named(path, tuple(options), unknown) for path, _ in paths]


def _command(path: tuple[str, ...]) -> Any:
    command = CLI
    for name in path:
        command = command.commands[name]
    return command


def _options_of(path: tuple[str, ...]) -> set[str]:
    """The options of the command and of every group on the way to it (group callbacks take
    options too: `meterline replay --from`, `meterline orgs --json`)."""
    found: set[str] = set()
    command = CLI
    for name in (None, *path):
        if name is not None:
            command = command.commands[name]
        for param in command.params:
            found.update(param.opts)
            found.update(param.secondary_opts)
    return found


def test_the_readme_names_commands_at_all() -> None:
    assert len(NAMED) >= 20
    assert any("--no-stripe" in text for text in NAMED)


@pytest.mark.parametrize("text", NAMED)
def test_every_command_and_option_the_readme_names_exists(text: str) -> None:
    for named in _resolve(text):
        assert named.unknown is None, f"{text!r}: no command {named.unknown!r}"
        missing = [option for option in named.options if option not in _options_of(named.path)]
        assert not missing, f"{text!r}: meterline {' '.join(named.path)} has no {missing}"
        result = CliRunner().invoke(app, [*named.path, "--help"])
        assert result.exit_code == 0, (text, result.output)


def _leaves(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    children = getattr(command, "commands", None)
    if not children:
        return [path]
    return [leaf for name, child in children.items() for leaf in _leaves(child, (*path, name))]


def test_every_command_of_the_cli_is_in_the_readme_table() -> None:
    documented = {named.path for text in _table_commands() for named in _resolve(text)}
    assert [" ".join(leaf) for leaf in _leaves(CLI) if leaf not in documented] == []
