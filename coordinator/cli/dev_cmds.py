"""``fleetwave dev up``: a broker, a coordinator and N agents on this machine, in the foreground."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from coordinator.cli.base import Ctx, FiniteRange, cli
from coordinator.dev import examples
from coordinator.dev.devfleet import MAX_AGENTS, MAX_BROKERS, DevFleet
from coordinator.errors import BrokerError, FleetwaveError
from protocol.bus import redact
from protocol.loop import bounded

WATCH_INTERVAL = 0.5


@cli.group()
def dev() -> None:
    """A whole fleet on this machine, for trying fleetwave out."""


@dev.command()
@click.option("--agents", type=click.IntRange(0, MAX_AGENTS), default=3, show_default=True,
              help="How many agents (node-1..N, bound to 127.0.1.1..N).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("fleetwave-dev"), show_default=True,
              help="Where JetStream data, agent data dirs and logs go.")
@click.option("--port", type=click.IntRange(1, 65535), default=4222, show_default=True,
              help="NATS port of the embedded broker (with --brokers N: the first of N).")
@click.option("--brokers", type=click.IntRange(1, MAX_BROKERS), default=1, show_default=True,
              help="Brokers: 1 (R1), or a JetStream cluster of N on 127.0.0.1 (3: R3 buckets).")
@click.option("--heartbeat-interval", type=FiniteRange(0.05, 300), default=None, hidden=True)
@click.option("--secure", is_flag=True, help="TLS and per-process credentials: a trust root in "
              "DIR/auth (fleetwave auth), each agent its node's, the coordinator its own.")
@click.pass_obj
def up(
    ctx: Ctx, agents: int, directory: Path, port: int, brokers: int,
    heartbeat_interval: float | None, secure: bool,
) -> int:
    """Run broker(s) + coordinator + agents in the foreground; Ctrl-C stops them all."""
    if port + brokers - 1 > 65535:  # the brokers listen on PORT..PORT+N-1 (``BrokerCluster``)
        raise click.BadParameter(
            f"--brokers {brokers} listen on ports {port} to {port + brokers - 1}, past 65535; "
            f"use --port {65535 - brokers + 1} or lower", param_hint="'--port'")
    return asyncio.run(_up(ctx, agents, directory, port, heartbeat_interval, brokers, secure))


async def _up(
    ctx: Ctx, agents: int, directory: Path, port: int, heartbeat_interval: float | None,
    brokers: int = 1, secure: bool = False,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fleet = DevFleet(
        directory, agents=agents, port=port, fleet=ctx.fleet,
        heartbeat_interval=heartbeat_interval, brokers=brokers, secure=secure,
    )
    click.echo(f"starting a dev fleet of {agents} agents and {brokers} broker(s) in {fleet.dir}"
               " ...", err=True)
    starting = asyncio.create_task(fleet.__aenter__())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()  # __aenter__ stops whatever it had started
    try:
        await starting
    except asyncio.CancelledError:
        click.echo("interrupted while starting; everything stopped", err=True)
        return 130
    finally:
        stopping.cancel()
    try:
        click.echo(describe(fleet, _example_bundles(fleet.dir)))
        return await _watch(fleet, stop)
    finally:
        click.echo("stopping agents, coordinator and broker ...", err=True)
        await fleet.stop()
        click.echo("dev fleet stopped", err=True)


async def _watch(fleet: DevFleet, stop: asyncio.Event) -> int:
    """Wait for Ctrl-C; report agents that die; give up if the broker or coordinator dies."""
    reported: set[str] = set()
    while not stop.is_set():
        if fleet.coordinator.returncode is not None:
            raise BrokerError(
                f"the coordinator exited with status {fleet.coordinator.returncode}; see "
                f"{fleet.coordinator.log_path}"
            )
        for a in fleet.agents:
            if a.returncode is not None and a.name not in reported:
                reported.add(a.name)
                click.echo(f"{a.name} exited with status {a.returncode}; see {a.log_path}",
                           err=True)
        if fleet.cluster is None and fleet.broker.pid is None:
            raise BrokerError("the broker stopped")
        for b in fleet.brokers if fleet.cluster is not None else []:
            if b.pid is None and b.server_name not in reported:  # the others carry on
                reported.add(b.server_name)
                click.echo(f"broker {b.server_name} stopped; the cluster carries on without it",
                           err=True)
        try:
            await bounded(stop.wait(), WATCH_INTERVAL)
        except TimeoutError:
            continue
    return 0


def _example_bundles(directory: Path) -> Path | None:
    """The hello example's bundles written under ``directory``, ready to push (None, with a
    word on stderr, if this installation has no examples)."""
    try:
        made = examples.bundles(directory / "examples" / "hello")
    except (FleetwaveError, OSError) as exc:
        click.echo(f"no example bundles: {exc}", err=True)
        return None
    return next(iter(made.values())).parent


def describe(fleet: DevFleet, bundles: Path | None = None) -> str:
    """What runs where, and how to use it."""
    lines = ["dev fleet is up:"]
    for b in fleet.brokers:
        name = f"  {b.server_name}" if fleet.cluster is not None else ""
        lines.append(f"  broker       {redact(b.url)}{name}  JetStream in {b.store_dir}")
    lines.append(f"  coordinator  pid {fleet.coordinator.pid}  log {fleet.coordinator.log_path}")
    for i, a in enumerate(fleet.agents, start=1):
        labels = ",".join(f"{k}={v}" for k, v in fleet.labels(i).items())
        lines.append(
            f"  {a.name:<11}  {fleet.host(i):<11}  {labels}  pid {a.pid}  log {a.log_path}"
        )
    fleet_flag = "" if fleet.fleet == "default" else f" --fleet {fleet.fleet}"
    lines += [
        "",
        "in another shell:",
        f"  export FLEETWAVE_NATS={fleet.nats_url}",
        *(f"  export {k}={v}" for k, v in fleet.client_env().items()),
        f"  fleetwave{fleet_flag} nodes",
    ]
    if bundles is not None:
        lines.append(f"  fleetwave{fleet_flag} release push {bundles / '1.0.0'}"
                     f"   # example bundles: {bundles}/<version>")
    lines += [
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)
