"""``fleetwave broker``: the embedded nats-server in the foreground, alone or as one member of a
cluster (``--name``, ``--cluster-listen``, ``--routes``: nats-server's own words)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from coordinator.cli.base import cli
from coordinator.dev.broker import Broker
from coordinator.dev.cluster import ClusterSpec, cluster_spec, watch_routes


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=4222, show_default=True,
              help="Port clients (agents, coordinators, the CLI) connect to.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--store-dir", type=click.Path(file_okay=False, path_type=Path),
    default=Path("./fleetwave-data/jetstream"), show_default=True,
    help="Where JetStream keeps its data.",
)
@click.option("--name", default=None, metavar="N",
              help="Server name, unique in the cluster (needed with --cluster-listen).")
@click.option("--cluster-listen", default=None, metavar="HOST:PORT",
              help="Join a cluster: where this broker takes the other brokers' routes.")
@click.option("--routes", default=None, metavar="URL,URL",
              help="The cluster's brokers, nats-route://HOST:PORT comma-separated (a route to "
              "this broker itself is ignored, so every broker can have the same list).")
@click.option("--auth", "auth_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, metavar="DIR",
              help="Serve TLS and the authorization of this 'fleetwave auth' directory; "
              "changes made there (add-node, revoke, renew) are reloaded within a second, "
              "credentials are cut off at their expiry, and cluster routes take mutual TLS "
              "and the fleet's route user.")
@click.option("--sweep-store", is_flag=True,
              help="Only remove, from --store-dir (a stopped server's), the consumers that "
              "deliver elsewhere than an inbox, and exit: what this broker does before its "
              "server starts, for a nats-server of your own (ExecStartPre in "
              "deploy/systemd/nats-server.service). A store a running server serves (a file of "
              "it open, or its command line or config naming it) is refused (exit 1), as is a "
              "broker started on it.")
def broker(port: int, host: str, store_dir: Path, name: str | None,
           cluster_listen: str | None, routes: str | None, auth_dir: Path | None,
           sweep_store: bool) -> int:
    """Run nats-server with JetStream in the foreground (Ctrl-C stops it)."""
    if sweep_store:
        from coordinator.runtime.deliveries import sweep_store as sweep

        removed = sweep(store_dir.absolute())
        click.echo(f"{store_dir}: removed {len(removed)} consumer(s) delivering elsewhere than "
                   "an inbox" + "".join(f"\n  {path}" for path in removed))
        return 0
    spec = cluster_spec(name, cluster_listen, routes)  # checked before anything is created
    return asyncio.run(_run_broker(port, host, store_dir.absolute(), name, spec, auth_dir))


async def _run_broker(port: int, host: str, store_dir: Path, name: str | None,
                      spec: ClusterSpec | None, auth_dir: Path | None = None) -> int:
    b = Broker(port=port, host=host, store_dir=store_dir, cluster=spec,
               server_name=name or "fleetwave", auth=auth_dir)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await b.start()
    except BaseException:
        await b.stop()
        raise
    joined = f", cluster port {spec.listen}" if spec is not None else ""
    if auth_dir is not None:
        joined += f", TLS and the users of {auth_dir}"
    click.echo(f"broker {b.server_name} ready on {b.url}{joined} (JetStream in {b.store_dir}); "
               "Ctrl-C to stop", err=True)
    waiter = asyncio.create_task(b.wait())
    stopper = asyncio.create_task(stopping.wait())
    routes = (asyncio.create_task(watch_routes(spec, b.monitor_port, _say, stopping))
              if spec is not None and spec.routes else None)
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if routes is not None:
            routes.cancel()
        if not waiter.done():
            waiter.cancel()
            await b.stop()
    if stopping.is_set():
        click.echo("broker stopped", err=True)
        return 0
    code = waiter.result()
    click.echo(f"broker exited with status {code}", err=True)
    return 1 if code else 0


def _say(line: str) -> None:
    click.echo(line, err=True)


@cli.command()
@click.option(
    "--examples", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
    help="The hello example's folder: app.py and a fleetwave.toml per version (default: the "
    "one shipped with fleetwave, deploy/examples/hello in a clone).",
)
@click.option("--keep", is_flag=True, help="Keep the fleet's directory and logs afterwards.")
@click.option("--secure", is_flag=True, help="Run the fleet over TLS with per-process "
              "credentials (as 'fleetwave dev up --secure').")
def demo(examples: Path | None, keep: bool, secure: bool) -> int:
    """A scripted tour on a throwaway fleet: install, roll, and an automatic rollback."""
    from coordinator.dev.demo import examples_dir, run_demo

    return asyncio.run(run_demo(examples_dir(examples), keep_dir=keep, secure=secure))
