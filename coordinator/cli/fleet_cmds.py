"""``fleetwave coordinator`` (the daemon, in the foreground) and ``fleetwave nodes``."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

import coordinator.cli.client as client
from coordinator.cli.base import (
    Ctx,
    FiniteRange,
    check_tls_ca,
    cli,
    creds_option,
    load_creds,
    output_option,
    tls_ca_option,
)
from coordinator.cli.render import cell, unclipped
from coordinator.core.fleet import parse_selector
from coordinator.core.history import KEEP_DEFAULT, KEEP_MAX, Retention, parse_age, parse_size
from coordinator.core.pace import DEFAULT_RATE
from coordinator.dev.cluster import parse_hostport
from coordinator.errors import UsageError
from coordinator.runtime.config import load as load_config
from coordinator.runtime.keyfile import coordinator_seed, previous_key
from coordinator.runtime.lease import LEASE_TTL
from coordinator.runtime.notify_doc import BadTarget, Target, parse_target
from protocol.bus import EventsLimits, redact
from protocol.codec import to_builtins
from protocol.errors import NoRoom, ProtocolError, ServerTooOld, TooFewServers

if TYPE_CHECKING:  # imported where the daemon starts: every other command starts ~1 s sooner
    from coordinator.auth import web_tokens
    from coordinator.runtime.notify import Notifier
from protocol.messages import KeyRequest, NodesRequest, NodeView


def _http_address(_: click.Context, __: click.Parameter,
                  value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_hostport(value, what="--http")
    except UsageError as exc:
        raise click.BadParameter(str(exc).removeprefix("--http ")) from None


def _notify_targets(_: click.Context, __: click.Parameter,
                    value: tuple[str, ...]) -> list[Target]:
    try:
        return [parse_target(url) for url in value]
    except BadTarget as exc:
        raise click.BadParameter(str(exc)) from None


def _events_age(_: click.Context, __: click.Parameter, value: str) -> float:
    try:
        return parse_age(value, what="--events-max-age")
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--events-max-age: ")) from None


def _events_bytes(_: click.Context, __: click.Parameter, value: str) -> int:
    try:
        return parse_size(value, what="--events-max-bytes")
    except OverflowError:
        raise click.BadParameter(f"{value!r} is far too large: 16MiB-1PiB") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--events-max-bytes: ")) from None


@cli.command()
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
@click.option(
    "--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    envvar="FLEETWAVE_KEY_FILE",
    help="Signing key (nkeys seed) for desired states; created 0600 if missing "
    "[default: fleetwave-data/coordinator/coordinator.seed]. A KEY.previous next to it (left by "
    "'fleetwave auth rotate-signing-key switch') names the key this one takes over from "
    "(env FLEETWAVE_KEY_FILE).",
)
@click.option(
    "--replicas", type=click.IntRange(1, 5), default=None, envvar="FLEETWAVE_REPLICAS",
    help="Copies of each bucket, the object store and the events stream; existing ones with "
    "fewer are raised [default: 3 on a JetStream cluster of 3+ servers, else 1] "
    "(env FLEETWAVE_REPLICAS).",
)
@click.option(
    "--notify", "notify", multiple=True, metavar="URL", callback=_notify_targets,
    envvar="FLEETWAVE_NOTIFY",
    help="POST a JSON document for every notable rollout event (started, wave passed, paused, "
    "gate failed, rolled back, succeeded, aborted, ...) to URL: http(s)://..., or "
    "slack+https://hooks.slack.com/... for Slack's incoming-webhook format. Repeatable; the "
    "leader sends each event once per URL, retrying with backoff (env FLEETWAVE_NOTIFY, URLs "
    "separated by spaces).",
)
@click.option(
    "--notify-secret", default=None, metavar="SECRET", envvar="FLEETWAVE_NOTIFY_SECRET",
    help="Sign every notification: X-Fleetwave-Signature: sha256=HMAC-SHA256(SECRET, "
    "TIMESTAMP + '.' + body), TIMESTAMP in X-Fleetwave-Timestamp (prefer the env "
    "FLEETWAVE_NOTIFY_SECRET: a flag shows in ps).",
)
@click.option(
    "--http", "http", default=None, metavar="HOST:PORT", callback=_http_address,
    envvar="FLEETWAVE_HTTP",
    help="Serve HTTP on HOST:PORT: /healthz (liveness), /readyz (set up and connected; the role), "
    "/metrics (Prometheus) and the dashboard at / [default: off; a loopback address such as "
    "127.0.0.1:9090 unless the page must be reached from elsewhere] (env FLEETWAVE_HTTP). "
    "Requests whose Host is not an IP address, localhost, HOST or a name listed in the env "
    "FLEETWAVE_HTTP_HOSTS (comma-separated: the name a proxy in front forwards) are answered "
    "421 (DNS rebinding); /healthz and /readyz answer any Host.",
)
@click.option(
    "--http-tokens", "http_tokens", default=None, metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path), envvar="FLEETWAVE_HTTP_TOKENS",
    help="Let the dashboard act (pause, resume, promote, abort, rollback) for whoever presents "
    "a token of FILE (made by 'fleetwave auth add-web-token DIR NAME': DIR/web-tokens.json); "
    "re-read when it changes, so a revocation needs no restart. Without it the dashboard is "
    "read-only (env FLEETWAVE_HTTP_TOKENS).",
)
@click.option(
    "--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
    envvar="FLEETWAVE_CONFIG",
    help="A TOML file with [[notify]] tables (url, and a secret per target) and http = "
    "\"HOST:PORT\"; --http and --notify given as flags (or env) replace the file's "
    "(env FLEETWAVE_CONFIG).",
)
@click.option(
    "--keep-rollouts", type=click.IntRange(0, KEEP_MAX), default=KEEP_DEFAULT,
    envvar="FLEETWAVE_KEEP_ROLLOUTS", show_default=True,
    help="Rollouts of each service kept whole (waves, nodes, report); older ones, once finished, "
    "are reduced to their summary ('fleetwave status ID' says 'summarised'), applied as each "
    f"service's next rollout is written (env FLEETWAVE_KEEP_ROLLOUTS; 0-{KEEP_MAX}).",
)
@click.option(
    "--events-max-age", default="90d", callback=_events_age, metavar="DUR",
    envvar="FLEETWAVE_EVENTS_MAX_AGE", show_default=True,
    help="Events older than this leave the events stream (the audit log): '90d', '720h'; "
    "1h-3650d. An existing stream is updated at start (env FLEETWAVE_EVENTS_MAX_AGE).",
)
@click.option(
    "--events-max-bytes", default="8GiB", callback=_events_bytes, metavar="SIZE",
    envvar="FLEETWAVE_EVENTS_MAX_BYTES", show_default=True,
    help="Past this size the oldest events leave the events stream: '512MiB', '8GiB', '2TB'; "
    "16MiB-1PiB, per copy. An existing stream is updated at start "
    "(env FLEETWAVE_EVENTS_MAX_BYTES).",
)
@click.option(
    "--lease-ttl", type=FiniteRange(1.0, 120.0), default=LEASE_TTL, show_default=True,
    metavar="SECONDS", envvar="FLEETWAVE_LEASE_TTL",
    help="A leader whose lease goes unrenewed this long stops leading, and a standby takes over "
    "(it waits for the longer of its own and the one the lease names). Renewed five times "
    "within it. Raise it where the leader's own work may pause it past 2 s: tens of thousands "
    "of nodes on a small host (see README, Performance); 1-120 (env FLEETWAVE_LEASE_TTL).",
)
@click.option(
    "--max-heartbeats-per-second", "heartbeat_rate", type=FiniteRange(0.01, 1_000_000.0),
    default=DEFAULT_RATE, show_default=True, metavar="RATE",
    envvar="FLEETWAVE_MAX_HEARTBEATS_PER_SECOND",
    help="The most heartbeats a second the fleet sends (every coordinator hears them all): the "
    "leader tells agents to beat every NODES/RATE seconds when that is longer than their own "
    "--heartbeat-interval (at most 300 s), and a node is offline after 3 missed beats. At the "
    "default a fleet of 10,000 beats every 5 s. Lower it on a small host, raise it to notice "
    "dead nodes sooner (see README, Heartbeat pace); 0.01-1000000 "
    "(env FLEETWAVE_MAX_HEARTBEATS_PER_SECOND).",
)
@creds_option
@tls_ca_option
@click.pass_obj
def coordinator(ctx: Ctx, verbose: bool, key_file: Path | None, replicas: int | None,
                notify: list[Target], notify_secret: str | None, http: tuple[str, int] | None,
                http_tokens: Path | None, config: Path | None, keep_rollouts: int,
                events_max_age: float, events_max_bytes: int, lease_ttl: float,
                heartbeat_rate: float, creds: Path | None, tls_ca: Path | None) -> int:
    """Run the coordinator daemon in the foreground (SIGTERM or Ctrl-C stops it)."""
    if config is not None:  # first: a bad file is one line before anything starts
        notify, http = load_config(config).under(notify, http)
    client.check_nats(ctx.nats_url)
    # Given here or globally (before the command word); a coordinator takes only its own role's.
    if creds is not None:
        ctx.creds = load_creds(creds, ctx.fleet)
    if ctx.creds is not None and ctx.creds.role != "coordinator":
        raise click.BadParameter(
            f"these are the {ctx.creds.role} {ctx.creds.name!r} credentials, not the "
            "coordinator's; pass DIR/coordinator.creds (made by 'fleetwave auth init')",
            param_hint="'--creds'")
    if tls_ca is not None:
        ctx.tls_ca = check_tls_ca(tls_ca)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s fleetwave-coordinator %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if http_tokens is not None and http is None:
        raise click.BadParameter("needs --http HOST:PORT (the dashboard it lets act)",
                                 param_hint="'--http-tokens'")
    # The daemon's modules (the runtime, the API, the engine, the notifier, cryptography) are
    # imported here, not with the CLI: every other command would pay for them at start-up
    # (measured 1.0-1.3 s of a 3.1 s import on the loaded 2-core machine, issue 17).
    from coordinator.auth import web_tokens
    from coordinator.runtime.daemon import tune_gc
    from coordinator.runtime.notify import Notifier

    tokens = web_tokens.TokenFile(http_tokens) if http_tokens is not None else None
    notifier = (Notifier(notify, secret=notify_secret.encode() if notify_secret else None)
                if notify else None)
    history = History(Retention(keep_rollouts),
                      EventsLimits(max_age=events_max_age, max_bytes=events_max_bytes),
                      lease_ttl, heartbeat_rate)
    path = key_file or Path("fleetwave-data/coordinator/coordinator.seed")
    # Made after every check (an --http address that cannot be listened on included): a run
    # refused at start leaves no new signing key behind.
    if http is not None:
        _check_listen(*http)
    seed = coordinator_seed(path)
    tune_gc()
    # asyncio's own loop, not uvloop (``protocol.loop``): measured at 50,000 simulated nodes,
    # uvloop raised the coordinator's peak RSS from 445 to 532 MiB (past the 500 MB target) for
    # a rollout time within the machine's noise (77.5 against 80.0 s).
    return asyncio.run(_run_coordinator(ctx, seed, replicas, previous_key(path, seed), notifier,
                                        http, tokens, history))


def _check_listen(host: str, port: int) -> None:
    """UsageError, in the HTTP surface's words, if ``host``:``port`` cannot be listened on now
    (``HttpSurface.start`` binds it for good later, once the coordinator is built)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except (OSError, OverflowError) as exc:
        why = ("address already in use" if getattr(exc, "errno", None) == errno.EADDRINUSE
               else getattr(exc, "strerror", None) or str(exc))
        raise UsageError(f"--http {host}:{port}: cannot listen ({why}); choose another address "
                         "or stop what holds it") from None


@dataclass(frozen=True)
class History:
    """What the coordinator keeps of the past: rollouts whole, and events."""

    rollouts: Retention
    events: EventsLimits
    # Not history, but how the leader runs: how long its lease outlives its last renewal, and
    # the heartbeats a second it lets the fleet send (``coordinator.core.pace``).
    lease_ttl: float = LEASE_TTL
    heartbeat_rate: float = DEFAULT_RATE


async def _run_coordinator(ctx: Ctx, seed: bytes, replicas: int | None,
                           previous: str | None = None, notifier: Notifier | None = None,
                           http: tuple[str, int] | None = None,
                           tokens: web_tokens.TokenFile | None = None,
                           history: History | None = None) -> int:
    from coordinator.runtime.daemon import Coordinator

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    logging.getLogger("fleetwave.coordinator").info(
        "connecting to %s for fleet %r", redact(ctx.nats_url), ctx.fleet
    )
    coord = Coordinator(ctx.nats_url, ctx.fleet, seed=seed, replicas=replicas,
                        previous_key=previous, notifier=notifier,
                        retention=history.rollouts if history else None,
                        events_limits=history.events if history else None,
                        lease_ttl=history.lease_ttl if history else LEASE_TTL,
                        heartbeat_rate=history.heartbeat_rate if history else DEFAULT_RATE,
                        **ctx.access())
    surface = None
    if http is not None:
        from coordinator.http.server import HttpSurface  # aiohttp: only for a coordinator serving

        surface = HttpSurface(coord, *http, tokens=tokens)
    if surface is not None:
        await surface.start()  # before the bus: an address in use is one line at once
    try:
        await coord.run(stop)
    except (TooFewServers, NoRoom, ServerTooOld) as exc:
        # exit 2: an operator's flag or server to change, not a failure
        raise UsageError(str(exc)) from None
    finally:
        if surface is not None:
            await surface.stop()
    return 0


def _selector(_: click.Context, __: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_selector(value, what="--selector")
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.option(
    "-l", "--selector", multiple=True, callback=_selector, metavar="KEY=VALUE",
    help="Only nodes with this label (repeatable; all must match).",
)
@output_option
@click.pass_obj
def nodes(ctx: Ctx, selector: dict[str, str], output: str) -> None:
    """List the fleet's nodes: online, offline or not heard yet (by a coordinator that has
    just started: it counts none offline before its startup grace), last seen, load and
    services."""
    data = client.request(ctx, "nodes", NodesRequest(selector=selector))
    try:
        rows = msgspec.convert(data, list[NodeView])
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"the coordinator sent an unexpected node list: {exc}") from None
    if output == "json":
        click.echo(json.dumps([to_builtins(r) for r in rows], indent=2, sort_keys=True))
        return
    if not rows:
        which = " matching " + ",".join(f"{k}={v}" for k, v in selector.items()) if selector else ""
        click.echo(f"no nodes{which} in fleet {ctx.fleet!r}; start agents with 'fleetwave-agent'")
        return
    Console(soft_wrap=True).print(render_table(rows, time.time()))
    if line := client.leader_line(ctx):
        click.echo(line)


def _status(r: NodeView) -> str:
    if r.online:
        return "[green]online[/]"
    return "[yellow]not heard yet[/]" if r.unheard else "[red]offline[/]"


def render_table(rows: list[NodeView], now: float) -> Table:
    """The people's view of ``fleetwave nodes``."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NODE", "STATUS", "CORDON", "LAST SEEN", "CPU", "MEM", "LABELS", "SERVICES"):
        table.add_column(col)
    for r in rows:
        table.add_row(  # what a node registered is shown as text (render.cell), never markup
            cell(r.id),
            _status(r),
            _cordon(r),
            _ago(r.last_seen, now),
            _pct(r.cpu_percent),
            _pct(r.mem_percent),
            cell(",".join(f"{k}={v}" for k, v in sorted(r.labels.items())) or "-"),
            cell(_services(r.services) or "-"),
        )
    return unclipped(table)


def _cordon(r: NodeView) -> Text | str:
    """"-", or "cordoned"/"drained" and by whom (the name as text, never markup)."""
    if r.cordon is None:
        return "-"
    what = "drained" if r.cordon.drain else "cordoned"
    return cell(what + (f" by {r.cordon.by}" if r.cordon.by else ""), style="yellow")


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _services(services: dict[str, Any]) -> str:
    parts = []
    for name, s in sorted(services.items()):
        version = s.get("version", "") if isinstance(s, dict) else ""
        healthy = isinstance(s, dict) and s.get("healthy")
        parts.append(f"{name}@{version or '?'}" + ("" if healthy else " (unhealthy)"))
    return " ".join(parts)


@cli.command()
@output_option
@click.pass_obj
def key(ctx: Ctx, output: str) -> None:
    """Print the coordinator's public signing key (what agents take as --trust-key)."""
    data = client.request(ctx, "key", KeyRequest())
    if not isinstance(data, dict) or not isinstance(data.get("public_key"), str):
        raise ProtocolError(f"the coordinator sent an unexpected key reply: {data!r}")
    if output == "json":
        click.echo(json.dumps({"public_key": data["public_key"]}))
    else:
        click.echo(data["public_key"])
