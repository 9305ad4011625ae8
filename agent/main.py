"""``fleetwave-agent``: the agent's command line (also ``python -m agent.main``).

Parses and checks the flags (one-line errors, exit 2), builds the Agent in one place
(``build_agent``) and runs it until SIGTERM or SIGINT (exit 0). Anything unexpected is a bug: it
is logged with its traceback and the process exits 1, for systemd to restart it.

Footprint: the agent runs on every host, so what it imports stays resident on every host. The
bus (and with it nats-py) is imported only once the flags are good, and without
``importlib.metadata``: nats-py looks its own version up with it on import, which loads email,
zipfile, csv and more, 2.6 MiB of resident memory for one string in CONNECT (``_import_bus``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent import presence
from protocol.errors import ProtocolError
from protocol.signing import check_public_key
from protocol.subjects import check_name

if TYPE_CHECKING:
    from agent.daemon import Agent, AgentOptions

DEFAULT_NATS = "nats://127.0.0.1:4222"

log = logging.getLogger("fleetwave.agent")


def _import_bus() -> None:
    """Import ``protocol.bus`` (so nats-py) without letting nats-py import ``importlib.metadata``.

    nats-py 2.x runs ``try: from importlib.metadata import version ... except Exception:`` on
    import; a ``None`` in ``sys.modules`` makes that import fail (documented import-system
    behaviour), so nats-py takes its fallback, and the real version is put back from the name of
    its dist-info directory (one directory listing). Nothing is done when ``importlib.metadata``
    is loaded already (a test run, say): there is nothing to save.
    """
    if "protocol.bus" in sys.modules or "importlib.metadata" in sys.modules:
        import protocol.bus  # already paid for, or nothing to save
        return
    sys.modules["importlib.metadata"] = None  # type: ignore[assignment]  # blocks the import
    try:
        import protocol.bus  # noqa: F401
    finally:
        del sys.modules["importlib.metadata"]
    import nats
    import nats.aio.client as nats_client

    site = Path(nats.__file__).resolve().parent.parent
    with contextlib.suppress(OSError):
        for dist in site.glob("nats_py-*.dist-info"):
            nats_client.__version__ = dist.name[len("nats_py-"):-len(".dist-info")]
            break


def build_agent(options: AgentOptions, trusted_keys: tuple[str, ...] = ()) -> Agent:
    """The one place an Agent is put together: the daemon with its service manager plugged in."""
    _import_bus()
    from agent.daemon import Agent
    from agent.shell import ServiceManager  # here: the daemon alone must not need the shell
    from protocol.bus import Bus

    def services(bus: Bus) -> ServiceManager:
        return ServiceManager(
            bus=bus, fleet=options.fleet, node=options.node_id, data_dir=options.data_dir,
            bind_host=options.bind_host, trusted_keys=trusted_keys,
        )

    return Agent(options, services=services)


def _node_id(_: click.Context, __: click.Parameter, value: str) -> str:
    try:
        return check_name("node", value)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


def _fleet(_: click.Context, __: click.Parameter, value: str) -> str:
    try:
        return check_name("fleet", value)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


def _labels(_: click.Context, __: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    try:
        return presence.parse_labels(value)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


def _bind_host(_: click.Context, __: click.Parameter, value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IP address, e.g. 127.0.0.1") from None
    return value


def _trust_keys(_: click.Context, __: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(check_public_key(k) for k in value)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


def _interval(_: click.Context, __: click.Parameter, value: float) -> float:
    try:
        return presence.check_interval(value)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--node-id", required=True, callback=_node_id, help="This node's id (unique).")
@click.option(
    "--label", "labels", multiple=True, callback=_labels, metavar="KEY=VALUE",
    help="A label for selectors, e.g. zone=a (repeatable).",
)
@click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where the agent keeps releases and state [default: ./fleetwave-data/agent-<node-id>].",
)
@click.option(
    "--bind-host", default="127.0.0.1", show_default=True, callback=_bind_host,
    help="Address the node's routers and slots listen on.",
)
@click.option(
    "--nats", "nats_url", envvar="FLEETWAVE_NATS", default=DEFAULT_NATS, show_default=True,
    help="NATS server URL, or several separated by commas (env FLEETWAVE_NATS).",
)
@click.option(
    "--fleet", envvar="FLEETWAVE_FLEET", default="default", show_default=True, callback=_fleet,
    help="Fleet namespace (env FLEETWAVE_FLEET).",
)
@click.option(
    "--heartbeat-interval", type=float, envvar="FLEETWAVE_HEARTBEAT_INTERVAL",
    default=presence.DEFAULT_INTERVAL, callback=_interval, hidden=True,
    help="Seconds between heartbeats (tests use short ones).",
)
@click.option(
    "--trust-key", "trust_keys", multiple=True, envvar="FLEETWAVE_TRUST_KEYS", metavar="KEY",
    callback=_trust_keys,
    help="Public key of a coordinator whose desired states to accept (repeatable; env "
    "FLEETWAVE_TRUST_KEYS, space-separated).",
)
@click.option(
    "--simulate", type=click.IntRange(0, 100_000), default=0, metavar="N",
    help="Host N simulated nodes <node-id>-1..N (instant slots) for control-plane scale tests.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def agent_command(
    node_id: str,
    labels: dict[str, str],
    data_dir: Path | None,
    bind_host: str,
    nats_url: str,
    fleet: str,
    heartbeat_interval: float,
    trust_keys: tuple[str, ...],
    simulate: int,
    verbose: bool,
) -> int:
    """Run the fleetwave agent for this node in the foreground (SIGTERM or Ctrl-C stops it)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s fleetwave-agent[{node_id}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    _import_bus()
    from agent.daemon import AgentOptions

    directory = (data_dir or Path(f"fleetwave-data/agent-{node_id}")).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(
            f"cannot create the data dir {directory}: {exc.strerror}; pick another with --data-dir"
        ) from None
    options = AgentOptions(
        node_id=node_id,
        nats_url=nats_url,
        fleet=fleet,
        labels=labels,
        data_dir=directory,
        bind_host=bind_host,
        heartbeat_interval=heartbeat_interval,
    )
    if not trust_keys:
        log.warning("no --trust-key given: every desired state will be refused")
    if simulate:
        return asyncio.run(_run_simulated(options, trust_keys, simulate))
    return asyncio.run(_run(build_agent(options, trust_keys)))


async def _run(agent: Agent) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)
    return 0


async def _run_simulated(options: AgentOptions, trusted_keys: tuple[str, ...], count: int) -> int:
    """Run ``count`` simulated nodes on one connection until SIGTERM or SIGINT."""
    from agent.hostinfo import HostSampler
    from agent.simulate import SimulatedNodes
    from protocol.bus import Bus

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    connecting = asyncio.create_task(Bus.connect(
        options.nats_url, options.fleet, name=f"fleetwave-sim-{options.node_id}",
        connect_deadline=10 * 365 * 24 * 3600.0, reconnect_forever=True,
    ))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
        return 0
    stopping.cancel()
    bus = connecting.result()
    sim = SimulatedNodes(
        bus=bus, fleet=options.fleet, base=options.node_id, count=count, labels=options.labels,
        trusted_keys=trusted_keys, bind_host=options.bind_host,
        sampler=HostSampler(options.data_dir), interval=options.heartbeat_interval,
    )
    log.info("simulating %d nodes %s-1..%d", count, options.node_id, count)
    try:
        running = asyncio.create_task(sim.run())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running  # re-raises if the simulation itself failed: a bug, exit 1
    finally:
        await bus.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fleetwave-agent``: one line and exit 2 for bad flags, 1 for a failure."""
    try:
        code = agent_command.main(args=argv, prog_name="fleetwave-agent", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        msg = exc.format_message().replace("\n", " ")
        hint = " (see 'fleetwave-agent --help')" if isinstance(exc, click.UsageError) else ""
        click.echo(f"fleetwave-agent: {msg}{hint}", err=True)
        sys.exit(exc.exit_code)
    except Exception:
        # A bug: the traceback goes to the log (journald), the exit status to systemd.
        log.exception("fleetwave-agent crashed")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
