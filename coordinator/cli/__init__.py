"""The ``fleetwave`` command line: thin click commands that parse, call one function, render.

Errors are caught here and only here: a FleetwaveError or ProtocolError becomes one line on stderr
and its exit code (1 error, 2 usage); click's own usage errors also exit 2 with one line. Commands
live in one module per area and register themselves on ``cli``, which imports a command's module
when that command is asked for (``base.COMMANDS``).
"""

# ruff: noqa: E402  (the bus is imported first, without aiohttp: see import_bus below)
from __future__ import annotations

import atexit
import gc
import sys
from typing import Any

import click

from protocol.imports import import_bus

import_bus()  # first, without aiohttp: 0.2 s of every command's start (protocol.imports)

# Each module adds its commands to ``cli`` when imported, which ``cli`` does for the command
# asked for only (``base.COMMANDS``).
from coordinator.cli import base
from coordinator.cli.base import Ctx, cli
from coordinator.errors import FleetwaveError
from protocol.errors import BusError, CredentialsLapsed, ProtocolError

__all__ = ["Ctx", "cli", "main"]

# The interpreter's last full collection at exit walks every object the imports made (nats-py's
# dataclasses, click, rich, msgspec types): 25-60 ms of every command's exit, measured, against
# 6 ms with them frozen first (gc.freeze: left to the OS; the modules' teardown still runs, and
# every file the CLI writes is closed by then). A followed deploy is done when it exits. (The
# ``fleetwave`` script, ``coordinator.console``, skips the teardown altogether; this is for
# ``main`` run otherwise: ``python -m coordinator.daemon``.)
atexit.register(gc.freeze)


def _interrupted() -> str:
    """What a Ctrl-C says: a followed rollout runs on, and how to follow it again."""
    if not base.followed:
        return "fleetwave: interrupted"
    rid = base.followed[-1]
    return (f"fleetwave: interrupted; rollout {rid} runs on: follow it with 'fleetwave status "
            f"{rid}' (or stop it with 'fleetwave abort {rid}')")


def main(argv: list[str] | None = None) -> Any:
    """Entry point of ``fleetwave``: run the command, turn errors into one line and an exit code."""
    try:
        rv = cli.main(args=argv, prog_name="fleetwave", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(_interrupted(), err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        msg = exc.format_message().replace("\n", " ")
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"fleetwave: {msg}{hint}", err=True)
        sys.exit(exc.exit_code)
    except FleetwaveError as exc:
        click.echo(f"fleetwave: {exc}", err=True)
        sys.exit(exc.exit_code)
    except ProtocolError as exc:
        click.echo(f"fleetwave: {exc}", err=True)
        sys.exit(2)
    except BusError as exc:
        click.echo(f"fleetwave: {exc}", err=True)
        sys.exit(2 if isinstance(exc, CredentialsLapsed) else 1)
    except KeyboardInterrupt:
        click.echo(_interrupted(), err=True)
        sys.exit(130)
    if isinstance(rv, int):
        sys.exit(rv)
    sys.exit(0)
