"""``fleetwave-agent``: the agent's command line (also ``python -m agent.main``).

Parses and checks the flags (``agent.flags``; one-line errors, exit 2), builds the Agent in one
place (``build_agent``) and runs it until SIGTERM, SIGINT or SIGHUP (exit 0; ``STOP_SIGNALS``).
SIGHUP too: a closed terminal or a session's end must not kill the agent without its last state
save and without closing its connection; the agent has no configuration to reload. What the
user can fix (a data dir the agent cannot write, a state file it cannot read: checked before
connecting) is one line and exit 1. Anything unexpected is a bug: it is logged with its
traceback and the process exits 1, for systemd to restart it.

Footprint: the agent runs on every host, so what it imports stays resident on every host.
- The flags are parsed with argparse, not click (see ``agent.flags``); the click command other
  code inspects (``agent_command``: the dev fleet, tests) is built from the same table, on demand
  (module ``__getattr__``), so the agent process itself never imports click.
- The bus (and with it nats-py) is imported only once the flags are good, and without
  ``importlib.metadata`` (which loads zipfile, csv and more); see ``_import_bus``.
- ``main`` imports asyncio and hashlib without OpenSSL before anything else (``agent.lean``:
  5.9 MiB, loaded again only if a TLS connection needs it), so nothing this module imports at
  its top may import asyncio, hashlib or ssl (the unit tests check it): asyncio is imported in
  the functions that run the loop, and the trust-key check imports ``protocol.signing`` (which
  imports hashlib) when it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import lean
from agent.edge import Edge
from agent.errors import FlagError, StartupError
from agent.flags import PROG, check_identity, click_command, parse_flags
from protocol.errors import BusError, ProtocolError
from protocol.imports import import_bus

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping

    from agent.daemon import Agent, AgentOptions
    from agent.host.identity import RunAs
    from agent.metrics import LiveAgent

log = logging.getLogger("fleetwave.agent")

# Each stops the agent cleanly: its last state save, its connection closed (see the docstring).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _import_bus() -> None:
    """The bus without what the agent never needs (``protocol.imports.NOT_FOR_THE_BUS``):
    ``aiohttp`` is about 14 MiB of its 30 MB budget. (``email.parser``, which nats.js imports,
    stays: its ``BytesParser`` parses the headers of JetStream direct gets.)"""
    import_bus()


def build_agent(options: AgentOptions, live: LiveAgent | None = None) -> Agent:
    """The one place an Agent is put together: the daemon with its service manager plugged in
    (and shown to ``live``, what ``--metrics`` scrapes read, when given)."""
    _import_bus()
    from agent.daemon import Agent
    from agent.host.ports import claims_dir
    from agent.manager.shell import ServiceManager  # here: the daemon alone must not need it

    def services() -> ServiceManager:
        manager = ServiceManager(
            fleet=options.fleet, node=options.node_id, data_dir=options.data_dir,
            bind_host=options.bind_host, trusted_keys=options.trust_keys,
            run_as=options.service_user, router_as=options.router_user, edge=options.edge,
            service_users=options.service_users,
            port_claims=claims_dir(),
            prefetch=options.prefetch,
        )
        if live is not None:
            live.services = manager.services
            if (ahead := manager.prefetcher) is not None:
                live.prefetches = lambda: (ahead.fetched, ahead.failed)
        return manager

    agent = Agent(options, services=services)
    if live is not None:
        live.connected = lambda: agent.bus is not None and agent.bus.connected
    return agent


def metrics_endpoint(values: dict[str, Any]) -> tuple[socket.socket, LiveAgent] | None:
    """With ``--metrics``: its socket, bound now (FlagError, one line, if it cannot be: nothing
    else is done yet), and what a scrape reads. ``prometheus_client`` is imported only here:
    an agent without metrics pays nothing for it."""
    address: tuple[str, int] | None = values.get("metrics")
    if address is None:
        return None
    if values.get("simulate"):
        raise FlagError("'--metrics' cannot run with '--simulate': simulated nodes have no "
                        "routers or slots to measure")
    from agent.metrics_http import bind

    sock = bind(*address)
    lean.import_prometheus()  # only the parts it uses: 0.15 MiB, not 2.4 (agent.lean)
    from agent.metrics import LiveAgent

    return sock, LiveAgent(values["node_id"], values["labels"])


def check_data_dir(directory: Path) -> None:
    """StartupError (one line) unless the agent can work in ``directory``: its releases and
    logs can be made there, a file written, and the state file read (or there is none yet).
    Checked before connecting: found later, each would stop the running agent (and systemd
    would start it again, to fail alike, for ever)."""
    import os

    from agent.host.state import STATE_NAME, load_state

    probe = directory / f".probe.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        (directory / "releases").mkdir(mode=0o711, exist_ok=True)  # as ReleaseCache makes it
        (directory / "logs").mkdir(exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise StartupError(
            f"the data dir {directory} is not writable: {exc.strerror}{where}; make it "
            "writable by this user or pick another with --data-dir"
        ) from None
    try:
        load_state(directory / STATE_NAME)
    except ProtocolError as exc:
        raise StartupError(
            f"{exc}; make it readable by this user, move it aside (the agent then converges "
            "again from its desired states) or pick another --data-dir"
        ) from None


def __getattr__(name: str) -> Any:
    if name == "agent_command":  # built on first use only: the agent process never needs click
        command = click_command(start)
        globals()["agent_command"] = command
        return command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shared_user(services: RunAs | None, routers: RunAs | None,
                own: Mapping[str, RunAs] | None = None) -> str | None:
    """The warning for routers that run as a service's user (None: none does)."""
    effective = routers if routers is not None else services
    if effective is None:
        if own and os.geteuid() == 0:
            return ("services run as users of their own (--service-user SERVICE=USER) but the "
                    "routers, which face the internet, run as the agent's user, root; give them "
                    "a user of their own with --router-user")
        return None
    if services is not None and effective.uid == services.uid:
        return (f"the routers run as the services' user {services.name!r}: a service can stop "
                "its router and take its public port, or reach its control socket; give the "
                "routers a user of their own with --router-user")
    shared = sorted(s for s, u in (own or {}).items() if u.uid == effective.uid)
    if shared:
        return (f"the routers run as {effective.name!r}, the user of {', '.join(shared)}: it "
                "can stop its router and take its public port, or reach its control socket; "
                "give the routers a user of their own with --router-user")
    return None


def start(values: dict[str, Any]) -> int:
    """Run the agent (or the simulated nodes) with checked flag values until it is stopped."""
    node_id: str = values["node_id"]
    logging.basicConfig(
        level=logging.DEBUG if values["verbose"] else logging.INFO,
        format=f"%(asctime)s fleetwave-agent[{node_id}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    metrics = metrics_endpoint(values)  # first: a taken address must change nothing
    _import_bus()
    from agent.daemon import AgentOptions

    data_dir: Path | None = values["data_dir"]
    directory = (data_dir or Path(f"fleetwave-data/agent-{node_id}")).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if values["service_user"].given or values["router_user"] is not None:
            # Services (or routers) run as another user: they may reach their release (or
            # their socket's directory) by path, but list nothing (neither the data dir nor
            # releases/, whose names lead to every service's manifest and its [env]), and read
            # neither the state file (0600) nor any log. An older agent made releases/ 0755.
            directory.chmod(0o711)
            for sub, mode in (("releases", 0o711), ("logs", 0o700)):
                (directory / sub).mkdir(mode=mode, exist_ok=True)
                (directory / sub).chmod(mode)
    except OSError as exc:
        raise StartupError(
            f"cannot create the data dir {directory}: {exc.strerror}; pick another with --data-dir"
        ) from None
    if not values["simulate"]:  # simulated nodes keep no state, releases nor logs
        check_data_dir(directory)
    options = AgentOptions(
        node_id=node_id,
        nats_url=values["nats_url"],
        fleet=values["fleet"],
        labels=values["labels"],
        data_dir=directory,
        bind_host=values["bind_host"],
        heartbeat_interval=values["heartbeat_interval"],
        service_user=values["service_user"].default,
        service_users=dict(values["service_user"].by_service),
        router_user=values["router_user"],
        creds=values["creds"],
        tls_ca=values["tls_ca"],
        edge=Edge(max_connections=values["max_connections"], body_timeout=values["body_timeout"],
                  trusted_proxies=values["trusted_proxies"]),
        trust_keys=values["trust_keys"],
        prefetch=values["prefetch"],
    )
    if (shared := shared_user(values["service_user"].default, values["router_user"],
                              values["service_user"].by_service)) is not None:
        log.warning("%s", shared)
    trust_keys: tuple[str, ...] = values["trust_keys"]
    if not trust_keys:
        log.warning("no --trust-key given: every desired state will be refused")
    if values["creds"] is not None:
        import datetime as dt

        from protocol.creds import expiring

        soon = expiring(values["creds"], dt.datetime.now(dt.UTC))
        if soon is not None:
            log.warning("%s", soon)
    import asyncio

    if values["simulate"]:
        from protocol import loop

        return loop.run(_run_simulated(options, trust_keys, values["simulate"]))
    if metrics is None:
        return asyncio.run(_run(build_agent(options)))
    sock, live = metrics
    return asyncio.run(_run(build_agent(options, live), sock, live))


def _stopping(stop: asyncio.Event, sig: signal.Signals) -> None:
    """A stop signal: said once, then ``stop`` set (``Agent.run``: from now on it starts
    nothing; the services and routers serve on, for the next agent to adopt)."""
    if not stop.is_set():
        log.info("stopping on %s: nothing is started any more; the services and their routers "
                 "run on, for the next agent to adopt", sig.name)
    stop.set()


async def _run(agent: Agent, sock: socket.socket | None = None,
               live: LiveAgent | None = None) -> int:
    """Run ``agent`` until a stop signal (``STOP_SIGNALS``); with a metrics socket, serve
    ``/metrics`` from the start (while the agent still waits for NATS, too) until the agent has
    stopped."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, _stopping, stop, sig)
    if sock is None or live is None:
        await agent.run(stop)
        return 0
    from agent.metrics import AgentCollector
    from agent.metrics_http import MetricsServer, registry_renderer

    server = MetricsServer(sock, registry_renderer(AgentCollector(live)))
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(server.serve(), name="metrics")
        try:
            await agent.run(stop)
        finally:
            serving.cancel()
    return 0


async def _run_simulated(options: AgentOptions, trusted_keys: tuple[str, ...], count: int) -> int:
    """Run ``count`` simulated nodes on one connection until a stop signal (``STOP_SIGNALS``)."""
    import asyncio

    from agent.host.hostinfo import HostSampler
    from agent.simulate import SimulatedNodes
    from protocol.bus import Bus

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    connecting = asyncio.create_task(Bus.connect(
        options.nats_url, options.fleet, name=f"fleetwave-sim-{options.node_id}",
        connect_deadline=10 * 365 * 24 * 3600.0, reconnect_forever=True,
        creds=options.creds, tls_ca=options.tls_ca,
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
    lean.import_lean()  # first: before anything imports asyncio or hashlib
    try:
        values = parse_flags(sys.argv[1:] if argv is None else argv)
        check_identity(values)
    except FlagError as exc:
        print(f"{PROG}: {exc} (see '{PROG} --help')", file=sys.stderr)
        sys.exit(2)
    try:
        code = start(values)
    except FlagError as exc:  # --metrics: its address cannot be had (checked before anything)
        print(f"{PROG}: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        why = _fixable(exc)
        if why is None:
            # A bug: the traceback goes to the log (journald), the exit status to systemd.
            log.exception("fleetwave-agent crashed")
        else:
            print(f"{PROG}: {why}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def _fixable(exc: BaseException) -> str | None:
    """The one line of a failure the user can fix, also raised inside the agent's TaskGroups;
    None for a bug. StartupError: the host cannot run the agent as asked; BusError: the server
    refused our creds or TLS; ProtocolError: a backstop (a file of ours the agent cannot read
    past the start-up checks)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, StartupError | BusError | ProtocolError):
        return str(exc)
    return None


if __name__ == "__main__":
    main()
