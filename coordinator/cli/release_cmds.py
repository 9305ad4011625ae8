"""``fleetwave release push|list``: bundles into the fleet's object store, and what is there.

These talk to NATS directly (no coordinator needed); ``push`` creates the fleet's buckets if
they are missing (idempotent).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from coordinator.cli import client
from coordinator.cli.base import Ctx, cli, output_option
from coordinator.releases import ReleaseInfo, list_releases, push_release
from protocol.bus import Bus
from protocol.codec import to_builtins

T = TypeVar("T")


@cli.group()
def release() -> None:
    """Release bundles: push them to the fleet, list them."""


@release.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@output_option
@click.pass_obj
def push(ctx: Ctx, path: Path, output: str) -> None:
    """Validate the bundle at PATH (a directory or .tar.gz with fleetwave.toml) and store it."""
    result = asyncio.run(_with_bus(ctx, lambda bus: push_release(bus, path)))
    info = result.info
    if output == "json":
        click.echo(json.dumps({"status": result.status, **to_builtins(info)}, sort_keys=True))
        return
    what = f"{info.service} {info.version} ({info.digest}, {_size(info.size)})"
    if result.status == "pushed":
        click.echo(f"pushed {what}")
    elif result.status == "repaired":
        click.echo(f"{what} was recorded but its bundle was missing or damaged; uploaded again")
    else:
        click.echo(f"{what} already present; nothing to do")


@release.command(name="list")
@click.argument("service", required=False)
@output_option
@click.pass_obj
def list_cmd(ctx: Ctx, service: str | None, output: str) -> None:
    """List the releases pushed to the fleet (of SERVICE only, if given)."""
    rows = asyncio.run(_with_bus(ctx, lambda bus: list_releases(bus, service)))
    if output == "json":
        click.echo(json.dumps([to_builtins(r) for r in rows], sort_keys=True))
        return
    if not rows:
        click.echo("no releases" + (f" of {service}" if service else "") + " in this fleet")
        return
    click.echo(_table(rows))


async def _with_bus(ctx: Ctx, fn: Callable[[Bus], Awaitable[T]]) -> T:
    """``fn`` on a connection made as every command makes one (``client.connected``): a
    malformed --nats is a usage error at once, a broker that does not answer one line within
    the CLI's connect deadline (here it waited 5 s for "TimeoutError")."""
    async with client.connected(ctx) as bus:
        return await fn(bus)


def _table(rows: list[ReleaseInfo]) -> str:
    header = ("SERVICE", "VERSION", "DIGEST", "SIZE", "PORT", "PUSHED")
    lines = [
        (
            r.service, r.version, r.digest[:19], _size(r.size),
            "-" if r.port is None else str(r.port),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.pushed_at)),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *lines]
    )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"
