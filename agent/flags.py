"""``fleetwave-agent``'s flags: one table (``FLAGS``), an argparse parser, a click command.

Each flag is declared once, with the check that turns its text into a value or a one-line
``ProtocolError``; ``parse_flags`` (argparse: what the agent process uses) and ``click_command``
(built on demand, for code that inspects or drives the CLI with click) are both built from it.
argparse, not click, for the agent itself: click with its types module pulls in uuid, gettext and
more (0.8 MiB resident for one parse), and the agent runs on every host. Like ``agent.main``,
nothing imported at the top here may import asyncio, hashlib or ssl (see ``agent.lean``): the
checks that need more import it when they run.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent import presence
from agent.edge import BODY_TIMEOUT, MAX_CONNECTIONS
from agent.errors import FlagError
from protocol.errors import ProtocolError
from protocol.subjects import check_name
from protocol.urls import check_servers

if TYPE_CHECKING:
    import click

    from agent.host.identity import RunAs, ServiceUsers
    from protocol.creds import Creds

DEFAULT_NATS = "nats://127.0.0.1:4222"
PROG = "fleetwave-agent"
SUMMARY = ("Run the fleetwave agent for this node in the foreground (SIGTERM, SIGHUP or Ctrl-C "
           "stops it cleanly).")
MAX_SIMULATED = 100_000

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


def _service_users(values: tuple[str, ...]) -> ServiceUsers:
    from agent.host.identity import ServiceUsers

    return ServiceUsers.parse(values)


def _router_user(value: str) -> RunAs:
    from agent.host.identity import RunAs

    return RunAs.lookup(value, who="routers", flag="--router-user")


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


def _creds(value: str) -> Creds:
    from protocol import creds

    return creds.load(value)


def _tls_ca(value: str) -> str:
    if not Path(value).is_file():
        raise ProtocolError(f"{value} does not exist; pass the fleet's ca.pem (made by "
                            "'fleetwave auth init')")
    # Read now, as the connection will (it loads ssl: TLS needs it anyway): a file that holds
    # no certificate is the operator's to fix, not a crash after start-up.
    from protocol.imports import import_bus  # the bus as the agent imports it (agent.main)

    import_bus()
    from protocol.bus import tls_context

    tls_context(value)
    return value


def _metrics(value: str) -> tuple[str, int]:
    from agent.metrics_http import parse_address  # here: it imports asyncio (agent.lean)

    try:
        return parse_address(value)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _on_off(value: str) -> bool:
    said = value.strip().lower()
    if said in ("on", "true", "yes", "1"):
        return True
    if said in ("off", "false", "no", "0"):
        return False
    raise ProtocolError(f"{value!r} is neither on nor off")


def _nats(value: str) -> str:
    check_servers(value, flag="the URL")  # malformed: one line now, not a deadline later
    return value


def _data_dir(value: str) -> Path:
    if not value:  # Path("") is ".": the agent would fill the directory it was started in
        raise ProtocolError("it is empty; give a directory, e.g. /var/lib/fleetwave/agent, or "
                            "leave --data-dir out for ./fleetwave-data/agent-<node-id>")
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
    Flag(("--node-id",), "node_id", "This node's id (unique; env FLEETWAVE_NODE_ID). Required, "
         "unless --creds is a node's: then the name in that file.", _node_id,
         env="FLEETWAVE_NODE_ID", metavar="TEXT"),
    Flag(("--label",), "labels", "A label for selectors, e.g. zone=a (repeatable).", _labels,
         default=(), metavar="KEY=VALUE", repeat=True),
    Flag(("--data-dir",), "data_dir", "Where the agent keeps releases and state [default: "
         "./fleetwave-data/agent-<node-id>].", _data_dir, metavar="DIRECTORY"),
    Flag(("--bind-host",), "bind_host", "Address the node's routers and slots listen on.",
         _bind_host, default="127.0.0.1", metavar="TEXT", show_default=True),
    Flag(("--nats",), "nats_url", "NATS server URL, or several separated by commas (env "
         "FLEETWAVE_NATS).", _nats, default=DEFAULT_NATS, env="FLEETWAVE_NATS", metavar="TEXT",
         show_default=True),
    Flag(("--fleet",), "fleet", "Fleet namespace (env FLEETWAVE_FLEET).", _fleet,
         default="default", env="FLEETWAVE_FLEET", metavar="TEXT", show_default=True),
    Flag(("--creds",), "creds", "This node's credentials file, DIR/nodes/<node-id>.creds made "
         "by 'fleetwave auth add-node' (env FLEETWAVE_CREDS); with --simulate, a test fleet's "
         "DIR/coordinator.creds.", _creds, env="FLEETWAVE_CREDS",
         metavar="FILE"),
    Flag(("--tls-ca",), "tls_ca", "CA file the server's TLS certificate must be signed by; "
         "turns TLS on (env FLEETWAVE_TLS_CA).", _tls_ca, env="FLEETWAVE_TLS_CA",
         metavar="FILE"),
    Flag(("--heartbeat-interval",), "heartbeat_interval", "Seconds between heartbeats at "
         "least (tests use short ones); longer when the leader paces a large fleet "
         "('fleetwave coordinator --max-heartbeats-per-second').", _interval,
         default=str(presence.DEFAULT_INTERVAL),
         env="FLEETWAVE_HEARTBEAT_INTERVAL", metavar="FLOAT", hidden=True),
    Flag(("--trust-key",), "trust_keys", "Public key of a coordinator whose desired states to "
         "accept (repeatable; env FLEETWAVE_TRUST_KEYS, space-separated). The node's "
         "registration says which, for 'fleetwave auth rotate-signing-key'.", _trust_keys,
         default=(), env="FLEETWAVE_TRUST_KEYS", metavar="KEY", repeat=True),
    Flag(("--service-user",), "service_user", "Run services, their hooks and probes, and the "
         "routers as this user, not as the agent's (the agent must run as root; env "
         "FLEETWAVE_SERVICE_USER, space-separated). They then cannot read the agent's "
         "environment or data. SERVICE=USER (repeatable) runs that service as a user of its "
         "own: services then cannot read one another's environment either.",
         _service_users, default=(), env="FLEETWAVE_SERVICE_USER", metavar="[SERVICE=]USER",
         repeat=True),
    Flag(("--router-user",), "router_user", "Run the routers as this user instead, apart from "
         "the services (the agent must run as root; env FLEETWAVE_ROUTER_USER): a service then "
         "can neither stop its router and take its public port nor reach its control socket. "
         "Default: the --service-user (with it, the agent warns at start).",
         _router_user, env="FLEETWAVE_ROUTER_USER", metavar="USER"),
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
    Flag(("--metrics",), "metrics", "Serve Prometheus metrics at http://HOST:PORT/metrics: "
         "per service, slot and version the router's requests by status class, latency "
         "histogram, upstream failures, weights and mirror counts; slot health, restarts and "
         "memory; the agent's own memory and CPU (env FLEETWAVE_METRICS; off by default). "
         "Use an address only your Prometheus reaches: it needs no credentials.", _metrics,
         env="FLEETWAVE_METRICS", metavar="HOST:PORT"),
    Flag(("--prefetch",), "prefetch", "Fetch a release of a service this node runs as soon as "
         "it is pushed, so that its deploy finds it at hand: on or off (env "
         "FLEETWAVE_PREFETCH). Off: a release is fetched when a deploy needs it (a metered link "
         "where not every push is deployed).", _on_off, default="on", env="FLEETWAVE_PREFETCH",
         metavar="on|off", show_default=True),
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


def check_identity(values: dict[str, Any]) -> None:
    """Refuse credentials that are not this node's (another node's, fleet's, an operator's):
    the server would refuse them anyway, but only as a permissions violation in its own log.

    Without ``--node-id`` a node's credentials name the node (one file says who a host is, so
    enrolling one is: issue the file, copy it, start the agent); without either, the flag is
    missing."""
    found = values.get("creds")
    if values.get("node_id") is None:
        if found is None or found.role != "node" or values.get("simulate"):
            raise FlagError("Missing option '--node-id' (or '--creds' with a node's credentials, "
                            "whose name it takes).")
        values["node_id"] = found.name
    if found is None:
        return
    from protocol.creds import check_for

    # Simulated nodes share one connection, so no node's credentials can speak for them all:
    # a test fleet's coordinator credentials can (benchmarks measure the cost of TLS so).
    simulated = bool(values.get("simulate"))
    if simulated and found.role != "coordinator":
        raise FlagError("'--simulate' cannot run with a node's '--creds': the simulated nodes "
                        "share one connection; give it a test fleet's DIR/coordinator.creds, or "
                        "run it on a dev broker without auth")
    try:
        check_for(found, "given with --creds", fleet=values["fleet"],
                  role=None if simulated else "node", name=values["node_id"])
    except ProtocolError as exc:
        raise FlagError(f"Invalid value for '--creds': {exc}") from None


def click_command(run: Callable[[dict[str, Any]], int]) -> click.Command:
    """The same flags as a click command calling ``run`` with their values (for code that
    inspects or drives the CLI with click; the agent process itself never imports click)."""
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
                         callback=lambda **values: _run_checked(run, _identified(values)))


def _run_checked(run: Callable[[dict[str, Any]], int], values: dict[str, Any]) -> int:
    """``run(values)``, a FlagError it raises at start (``--metrics``' address taken) a click
    usage error."""
    import click

    try:
        return run(values)
    except FlagError as exc:
        raise click.UsageError(str(exc)) from None


def _identified(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` once ``check_identity`` passed them, its refusal a click usage error."""
    import click

    try:
        check_identity(values)
    except FlagError as exc:
        raise click.UsageError(str(exc)) from None
    return values
