"""``fleetwave-agent``: the agent's command line (also ``python -m agent.main``).

Parses and checks the flags (one-line errors, exit 2), builds the Agent in one place
(``build_agent``) and runs it until SIGTERM or SIGINT (exit 0). Anything unexpected is a bug: it
is logged with its traceback and the process exits 1, for systemd to restart it.

Footprint: the agent runs on every host, so what it imports stays resident on every host.
- The flags are parsed with argparse, not click (click with its types module pulls in uuid,
  gettext and more: 0.8 MiB resident for one parse). They are declared once, in ``FLAGS``; the
  click command other code inspects (``agent_command``: the dev fleet, tests) is built from the
  same table, on demand (module ``__getattr__``), so the agent process itself never imports click.
- The bus (and with it nats-py) is imported only once the flags are good, and without
  ``importlib.metadata`` (which loads zipfile, csv and more); see ``_import_bus``.
- ``main`` imports asyncio and hashlib without OpenSSL before anything else (``agent.lean``:
  5.9 MiB, loaded again only if a TLS connection needs it), so nothing this module imports at
  its top may import asyncio, hashlib or ssl (the unit tests check it): asyncio is imported in
  the functions that run the loop, and the trust-key check imports ``protocol.signing`` (which
  imports hashlib) when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent import lean, presence
from agent.edge import BODY_TIMEOUT, MAX_CONNECTIONS, Edge
from agent.errors import FlagError, StartupError
from protocol.errors import ProtocolError
from protocol.subjects import check_name

if TYPE_CHECKING:
    import click

    from agent.daemon import Agent, AgentOptions
    from agent.host.identity import RunAs

DEFAULT_NATS = "nats://127.0.0.1:4222"
PROG = "fleetwave-agent"
SUMMARY = "Run the fleetwave agent for this node in the foreground (SIGTERM or Ctrl-C stops it)."
MAX_SIMULATED = 100_000

log = logging.getLogger("fleetwave.agent")


def _import_bus() -> None:
    """Import ``protocol.bus`` with ``importlib.metadata`` blocked for the time of the import.

    A ``None`` in ``sys.modules`` makes an import fail (documented import-system behaviour); what
    imports it to look a version up takes its fallback (the bus then names nats-py's version
    itself: ``protocol.bus._name_client_version``). Nothing is done when ``importlib.metadata``
    is loaded already (a test run, say): there is nothing to save.

    (``email.parser``, which nats.js imports, stays: its ``BytesParser`` parses the headers of
    JetStream direct gets, the object store's included.)
    """
    if "protocol.bus" in sys.modules or "importlib.metadata" in sys.modules:
        import protocol.bus  # already paid for, or nothing to save
        return
    sys.modules["importlib.metadata"] = None  # type: ignore[assignment]  # blocks the import
    try:
        import protocol.bus
    except ImportError:
        # Some other import needed importlib.metadata after all (a newer nats-py, say): the
        # saving is not worth a dead agent, so import normally below and pay the memory.
        pass
    finally:
        del sys.modules["importlib.metadata"]
    import protocol.bus  # noqa: F401  # a no-op when the first import worked


def build_agent(options: AgentOptions, trusted_keys: tuple[str, ...] = ()) -> Agent:
    """The one place an Agent is put together: the daemon with its service manager plugged in."""
    _import_bus()
    from agent.daemon import Agent
    from agent.manager.shell import ServiceManager  # here: the daemon alone must not need it
    from protocol.bus import Bus

    def services(bus: Bus) -> ServiceManager:
        return ServiceManager(
            bus=bus, fleet=options.fleet, node=options.node_id, data_dir=options.data_dir,
            bind_host=options.bind_host, trusted_keys=trusted_keys, run_as=options.service_user,
            edge=options.edge,
        )

    return Agent(options, services=services)


# -- the flags -------------------------------------------------------------------------------------


def _node_id(value: str) -> str:
    return check_name("node", value)


def _fleet(value: str) -> str:
    return check_name("fleet", value)


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    return presence.parse_labels(values)


def _bind_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ProtocolError(f"{value!r} is not an IP address, e.g. 127.0.0.1") from None
    return value


def _trust_keys(values: tuple[str, ...]) -> tuple[str, ...]:
    from protocol.signing import check_public_key  # here: it imports hashlib (see the docstring)

    return tuple(check_public_key(k) for k in values)


def _interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ProtocolError(f"{value!r} is not a valid float.") from None
    return presence.check_interval(seconds)


def _service_user(value: str) -> RunAs:
    from agent.host.identity import RunAs

    return RunAs.lookup(value)


def _proxies(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ProtocolError(f"{value!r} is not an IP address or network (CIDR)") from None
    return values


def _max_connections(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ProtocolError(f"{value!r} is not a valid integer.") from None
    if n < 1:
        raise ProtocolError(f"{n} is below 1.")
    return n


def _body_timeout(value: str) -> float:
    from protocol.durations import parse_duration

    seconds = parse_duration(value, what="--router-body-timeout")
    if seconds <= 0:
        raise ProtocolError(f"{value!r} is not above zero")
    return seconds


def _simulate(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ProtocolError(f"{value!r} is not a valid integer.") from None
    if not 0 <= n <= MAX_SIMULATED:
        raise ProtocolError(f"{n} is not in the range 0<=x<={MAX_SIMULATED}.")
    return n


def _data_dir(value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ProtocolError(f"Directory '{value}' is a file.")
    return path


@dataclass(frozen=True)
class Flag:
    """One flag of ``fleetwave-agent``: the one declaration both parsers are built from.

    ``check`` takes the text given (a tuple of texts for a repeatable flag) and returns the value,
    or raises ProtocolError saying what is wrong. A repeatable flag's env var is split on spaces.
    """

    opts: tuple[str, ...]
    dest: str
    help: str
    check: Callable[[Any], Any] | None = None
    default: Any = None
    env: str | None = None
    metavar: str | None = None
    repeat: bool = False
    required: bool = False
    hidden: bool = False
    switch: bool = False
    show_default: bool = False


FLAGS: tuple[Flag, ...] = (
    Flag(("--node-id",), "node_id", "This node's id (unique).", _node_id, required=True,
         metavar="TEXT"),
    Flag(("--label",), "labels", "A label for selectors, e.g. zone=a (repeatable).", _labels,
         default=(), metavar="KEY=VALUE", repeat=True),
    Flag(("--data-dir",), "data_dir", "Where the agent keeps releases and state [default: "
         "./fleetwave-data/agent-<node-id>].", _data_dir, metavar="DIRECTORY"),
    Flag(("--bind-host",), "bind_host", "Address the node's routers and slots listen on.",
         _bind_host, default="127.0.0.1", metavar="TEXT", show_default=True),
    Flag(("--nats",), "nats_url", "NATS server URL, or several separated by commas (env "
         "FLEETWAVE_NATS).", default=DEFAULT_NATS, env="FLEETWAVE_NATS", metavar="TEXT",
         show_default=True),
    Flag(("--fleet",), "fleet", "Fleet namespace (env FLEETWAVE_FLEET).", _fleet,
         default="default", env="FLEETWAVE_FLEET", metavar="TEXT", show_default=True),
    Flag(("--heartbeat-interval",), "heartbeat_interval", "Seconds between heartbeats (tests "
         "use short ones).", _interval, default=str(presence.DEFAULT_INTERVAL),
         env="FLEETWAVE_HEARTBEAT_INTERVAL", metavar="FLOAT", hidden=True),
    Flag(("--trust-key",), "trust_keys", "Public key of a coordinator whose desired states to "
         "accept (repeatable; env FLEETWAVE_TRUST_KEYS, space-separated).", _trust_keys,
         default=(), env="FLEETWAVE_TRUST_KEYS", metavar="KEY", repeat=True),
    Flag(("--service-user",), "service_user", "Run services, their hooks and probes, and the "
         "routers as this user, not as the agent's (the agent must run as root; env "
         "FLEETWAVE_SERVICE_USER). They then cannot read the agent's environment or data.",
         _service_user, env="FLEETWAVE_SERVICE_USER", metavar="USER"),
    Flag(("--router-trusted-proxy",), "trusted_proxies", "An address or network (CIDR) of a "
         "proxy in front of this node whose X-Forwarded-For the routers keep and append to; "
         "from anyone else it is replaced by the peer's address (repeatable; env "
         "FLEETWAVE_ROUTER_TRUSTED_PROXIES, space-separated).", _proxies, default=(),
         env="FLEETWAVE_ROUTER_TRUSTED_PROXIES", metavar="CIDR", repeat=True),
    Flag(("--router-max-connections",), "max_connections", "Client connections one router "
         "holds at once; more are answered 503 and closed.", _max_connections,
         default=str(MAX_CONNECTIONS), env="FLEETWAVE_ROUTER_MAX_CONNECTIONS", metavar="N",
         show_default=True),
    Flag(("--router-body-timeout",), "body_timeout", "How long a router waits for a whole "
         "request body after its head (then 408).", _body_timeout,
         default=f"{BODY_TIMEOUT:g}s", env="FLEETWAVE_ROUTER_BODY_TIMEOUT", metavar="DURATION",
         show_default=True),
    Flag(("--simulate",), "simulate", "Host N simulated nodes <node-id>-1..N (instant slots) for "
         f"control-plane scale tests.  [0<=x<={MAX_SIMULATED}]", _simulate, default="0",
         metavar="N"),
    Flag(("-v", "--verbose"), "verbose", "Log debug details.", default=False, switch=True),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise FlagError(message[:1].upper() + message[1:] + ".")


def _argparser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=SUMMARY, add_help=False, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="help", help="Show this message and exit.")
    for f in FLAGS:
        text = argparse.SUPPRESS if f.hidden else f.help + (
            f"  [default: {f.default}]" if f.show_default else ""
        ) + ("  [required]" if f.required else "")
        if f.switch:
            parser.add_argument(*f.opts, dest=f.dest, action="store_true", help=text)
        else:
            parser.add_argument(*f.opts, dest=f.dest, metavar=f.metavar, help=text,
                                action="append" if f.repeat else "store")
    return parser


def parse_flags(argv: Sequence[str], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The checked value of every flag by its ``dest``, or FlagError (one line, nothing done).

    Precedence as with click: the command line, then the flag's env var, then its default.
    """
    env = os.environ if environ is None else environ
    given, extra = _argparser().parse_known_args(list(argv))
    if extra:
        raise FlagError(f"No such option '{extra[0]}'." if extra[0].startswith("-")
                         else f"Got unexpected extra argument ({extra[0]}).")
    values: dict[str, Any] = {}
    for f in FLAGS:
        raw = getattr(given, f.dest)
        if f.switch:
            values[f.dest] = bool(raw)
            continue
        if raw is None and f.env and env.get(f.env):
            raw = env[f.env].split() if f.repeat else env[f.env]
        if raw is None:
            if f.required:
                raise FlagError(f"Missing option '{f.opts[-1]}'.")
            raw = f.default
        if f.repeat:
            raw = tuple(raw)
        try:
            values[f.dest] = f.check(raw) if f.check is not None and raw is not None else raw
        except ProtocolError as exc:
            raise FlagError(f"Invalid value for '{f.opts[-1]}': {exc}") from None
    return values


def _click_command() -> click.Command:
    """The same flags as a click command (for code that inspects or drives the CLI with click)."""
    import click

    def callback(f: Flag) -> Callable[[click.Context, click.Parameter, Any], Any]:
        def check(_: click.Context, __: click.Parameter, value: Any) -> Any:
            if f.check is None or value is None:
                return value
            try:
                return f.check(tuple(value) if f.repeat else value)
            except ProtocolError as exc:
                raise click.BadParameter(str(exc)) from None
        return check

    params: list[click.Parameter] = [
        click.Option([*f.opts, f.dest], is_flag=f.switch, multiple=f.repeat, envvar=f.env,
                     default=f.default, required=f.required, hidden=f.hidden, help=f.help,
                     metavar=f.metavar, show_default=f.show_default, callback=callback(f))
        for f in FLAGS
    ]
    return click.Command(PROG, params=params, help=SUMMARY,
                         context_settings={"help_option_names": ["-h", "--help"]},
                         callback=lambda **values: start(values))


def __getattr__(name: str) -> Any:
    if name == "agent_command":  # built on first use only: the agent process never needs click
        command = _click_command()
        globals()["agent_command"] = command
        return command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def start(values: dict[str, Any]) -> int:
    """Run the agent (or the simulated nodes) with checked flag values until it is stopped."""
    node_id: str = values["node_id"]
    logging.basicConfig(
        level=logging.DEBUG if values["verbose"] else logging.INFO,
        format=f"%(asctime)s fleetwave-agent[{node_id}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    _import_bus()
    from agent.daemon import AgentOptions

    data_dir: Path | None = values["data_dir"]
    directory = (data_dir or Path(f"fleetwave-data/agent-{node_id}")).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if values["service_user"] is not None:
            # Services run as another user: they may reach their release by path, but list
            # nothing, and read neither the state file (0600) nor any log.
            directory.chmod(0o711)
            (directory / "logs").mkdir(mode=0o700, exist_ok=True)
            (directory / "logs").chmod(0o700)
    except OSError as exc:
        raise StartupError(
            f"cannot create the data dir {directory}: {exc.strerror}; pick another with --data-dir"
        ) from None
    options = AgentOptions(
        node_id=node_id,
        nats_url=values["nats_url"],
        fleet=values["fleet"],
        labels=values["labels"],
        data_dir=directory,
        bind_host=values["bind_host"],
        heartbeat_interval=values["heartbeat_interval"],
        service_user=values["service_user"],
        edge=Edge(max_connections=values["max_connections"], body_timeout=values["body_timeout"],
                  trusted_proxies=values["trusted_proxies"]),
    )
    trust_keys: tuple[str, ...] = values["trust_keys"]
    if not trust_keys:
        log.warning("no --trust-key given: every desired state will be refused")
    import asyncio

    if values["simulate"]:
        return asyncio.run(_run_simulated(options, trust_keys, values["simulate"]))
    return asyncio.run(_run(build_agent(options, trust_keys)))


async def _run(agent: Agent) -> int:
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)
    return 0


async def _run_simulated(options: AgentOptions, trusted_keys: tuple[str, ...], count: int) -> int:
    """Run ``count`` simulated nodes on one connection until SIGTERM or SIGINT."""
    import asyncio

    from agent.host.hostinfo import HostSampler
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
    lean.import_lean()  # first: before anything imports asyncio or hashlib
    try:
        values = parse_flags(sys.argv[1:] if argv is None else argv)
    except FlagError as exc:
        print(f"{PROG}: {exc} (see '{PROG} --help')", file=sys.stderr)
        sys.exit(2)
    try:
        code = start(values)
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        # A bug: the traceback goes to the log (journald), the exit status to systemd.
        log.exception("fleetwave-agent crashed")
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
