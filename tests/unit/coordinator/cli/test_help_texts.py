"""Every option of every ``fleetwave`` command says in its ``--help`` what it is for."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import click
from click.testing import CliRunner

from coordinator.cli import base, cli


def commands(command: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from commands(sub, f"{path} {name}")


def test_every_option_has_help_text() -> None:
    """Walking the whole command tree (every command's module imported), no option shows in
    ``--help`` without a word of help (``broker --port`` had none)."""
    for module in sorted(set(base.COMMANDS.values())):
        importlib.import_module(f"coordinator.cli.{module}")
    bare = [f"{path} {'/'.join(param.opts)}" for path, command in commands(cli, "fleetwave")
            for param in command.params
            if isinstance(param, click.Option) and not param.hidden and not param.help]
    assert bare == []


def test_broker_port_says_what_it_is() -> None:
    """``broker --help`` explains --port, next to its default."""
    out = CliRunner().invoke(cli, ["broker", "--help"], terminal_width=200).output
    (line,) = [line for line in out.splitlines() if line.strip().startswith("--port")]
    assert "Port clients" in line and "[default: 4222" in line, line
