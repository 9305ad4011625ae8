"""``fleetwave broker``: the embedded nats-server in the foreground."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from coordinator.cli.base import cli
from coordinator.dev.broker import Broker


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=4222, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--store-dir", type=click.Path(file_okay=False, path_type=Path),
    default=Path("./fleetwave-data/jetstream"), show_default=True,
    help="Where JetStream keeps its data.",
)
def broker(port: int, host: str, store_dir: Path) -> int:
    """Run nats-server with JetStream in the foreground (Ctrl-C stops it)."""
    return asyncio.run(_run_broker(port, host, store_dir.absolute()))


async def _run_broker(port: int, host: str, store_dir: Path) -> int:
    b = Broker(port=port, host=host, store_dir=store_dir)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await b.start()
    except BaseException:
        await b.stop()
        raise
    click.echo(f"broker ready on {b.url} (JetStream in {b.store_dir}); Ctrl-C to stop", err=True)
    waiter = asyncio.create_task(b.wait())
    stopper = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not waiter.done():
            waiter.cancel()
            await b.stop()
    if stopping.is_set():
        click.echo("broker stopped", err=True)
        return 0
    code = waiter.result()
    click.echo(f"broker exited with status {code}", err=True)
    return 1 if code else 0


@cli.command()
@click.option(
    "--examples", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
    help="The hello example's folder: app.py and a fleetwave.toml per version (default: the "
    "one shipped with fleetwave, deploy/examples/hello in a clone).",
)
@click.option("--keep", is_flag=True, help="Keep the fleet's directory and logs afterwards.")
def demo(examples: Path | None, keep: bool) -> int:
    """A scripted tour on a throwaway fleet: install, roll, and an automatic rollback."""
    from coordinator.dev.demo import examples_dir, run_demo

    return asyncio.run(run_demo(examples_dir(examples), keep_dir=keep))
