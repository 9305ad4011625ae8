"""``fleetwave cordon``, ``uncordon`` and ``drain``: holding nodes out for maintenance; and
``forget``: dropping decommissioned nodes from the fleet.

Each is one API request (``coordinator.api.cordons``); the coordinator checks the node or the
selector, so an unknown node or a selector matching nothing is one line and exit 2, and nothing
changes. ``drain --wait`` then reads the node's heartbeats (``nodes``) until every service on it
says "drained": its router neither accepts nor holds a connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

import coordinator.cli.client as client
from coordinator.cli.base import Ctx, cli, output_option
from coordinator.cli.render import safe
from coordinator.core.fleet import parse_selector
from coordinator.errors import FleetwaveError, UsageError
from protocol.durations import format_duration, parse_duration
from protocol.errors import ProtocolError
from protocol.messages import CordonRequest, ForgetRequest, NodesRequest

READY_PATH = "/.well-known/fleetwave/ready"  # agent.router.health; repeated for the help texts
DEFAULT_GRACE = "15s"
DEFAULT_DRAIN_TIMEOUT = "5m"
DRAIN_POLL = 1.0  # seconds between looks at the node's heartbeats (they come every 2 s)


def _selector(_: click.Context, __: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_selector(value, what="--selector")
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


def _grace(_: click.Context, __: click.Parameter, value: str) -> float:
    try:
        return parse_duration(value, what="--grace")
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


F = TypeVar("F", bound=Callable[..., Any])


def _node_args(verb: str) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        f = click.argument("node", required=False, default="")(f)
        return click.option(
            "-l", "--selector", multiple=True, callback=_selector, metavar="KEY=VALUE",
            help=f"{verb.capitalize()} every node with this label (repeatable; all must "
            "match) instead of one NODE.")(f)
    return decorate


def _render(data: Any, output: str, verb: str) -> None:
    rows = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ProtocolError(f"the coordinator sent an unexpected {verb} reply: {data!r}")
    if output == "json":
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for row in rows:
        state = ("forgotten" if row.get("forgotten") else "drained" if row.get("drained")
                 else "cordoned" if row.get("cordoned") else "uncordoned")
        said = f"{row.get('node')}: {state}" + ("" if row.get("changed", True) else " (already)")
        if verb == "drain" and row.get("changed"):
            said += (f"; its routers answer 503 on {READY_PATH} now and stop accepting after "
                     f"{format_duration(float(row.get('grace') or 0))}")
        click.echo(safe(said))


@cli.command()
@_node_args("cordon")
@output_option
@click.pass_obj
def cordon(ctx: Ctx, node: str, selector: dict[str, str], output: str) -> None:
    """Hold NODE (or every node --selector matches) out of new rollouts.

    A rollout started later skips a cordoned node and says so ("node-3 cordoned: skipped" in
    its status and events); the node keeps the version it runs and keeps serving. A rollout
    already running when the node is cordoned keeps it as a target and finishes (or rolls
    back) as planned. 'fleetwave uncordon' returns the node. Who cordoned it, and when, shows in
    'fleetwave nodes' and in the node.cordoned event.
    """
    _render(client.request(ctx, "cordon", CordonRequest(node=node, selector=selector)),
            output, "cordon")


@cli.command()
@click.argument("nodes", nargs=-1, required=True)
@output_option
@click.pass_obj
def forget(ctx: Ctx, nodes: tuple[str, ...], output: str) -> None:
    """Drop offline NODES (hosts decommissioned or replaced) from the fleet.

    Their registrations, observed states and cordons go: 'fleetwave nodes', the dashboard, the
    metrics, the heartbeat pace and new rollouts no longer count them (a box replaced keeps
    being reported offline, and listed as skipped by every deploy, until it is forgotten). A
    node must be offline (stop its agent first: one that beats registers again, as a new node)
    and no running rollout may target it; otherwise nothing is forgotten (exit 2, or 1 for a
    rollout in the way). Its desired states stay: an agent that comes back serves what it was
    told. Who forgot it, and when, is the node.forgotten event.
    """
    _render(client.request(ctx, "forget", ForgetRequest(nodes=list(nodes))), output, "forget")


@cli.command()
@_node_args("uncordon")
@output_option
@click.pass_obj
def uncordon(ctx: Ctx, node: str, selector: dict[str, str], output: str) -> None:
    """Return NODE (or every node --selector matches) to new rollouts; undo a drain.

    A drained node's routers serve again (they listen on the public port and answer 200 on
    their readiness path) before the cordon is removed.
    """
    _render(client.request(ctx, "uncordon", CordonRequest(node=node, selector=selector)),
            output, "uncordon")


@cli.command(help=f"""Cordon NODE and take its routers out of service for maintenance.

On every service with a public port, in this order: the router's readiness path
{READY_PATH} (on the service's public port, for an external load balancer's health
check) answers 503 at once, while requests are still served; after --grace (time for the load
balancer to notice and stop sending) the router stops accepting connections, lets requests in
flight finish, closes idle keep-alive connections, and stays closed. Service processes keep
running (so 'fleetwave uncordon NODE' brings the node back at once). Signed like every desired
state: an agent restarted meanwhile keeps the node drained. Refused while a rollout targets the
node (wait for it or abort it). With --wait it returns once the node is drained: every router on
it has stopped accepting and holds no connection (safe to reboot).
""")
@click.argument("node")
@click.option("--grace", default=DEFAULT_GRACE, show_default=True, callback=_grace,
              metavar="DUR", help="How long the readiness path answers 503 before the router "
              "stops accepting: at least your load balancer's interval x unhealthy threshold.")
@click.option("--wait", is_flag=True, help="Then wait until the node is drained: every router "
              "on it has stopped accepting and holds no connection (its requests in flight have "
              "finished), as its heartbeats say; exit 1 if that takes longer than --timeout (the "
              "drain goes on).")
@click.option("--timeout", default=None, metavar="DUR", help="With --wait: how long to wait "
              f"at most.  [default: {DEFAULT_DRAIN_TIMEOUT}]")
@output_option
@click.pass_obj
def drain(ctx: Ctx, node: str, grace: float, wait: bool, timeout: str | None,
          output: str) -> None:
    if timeout is not None and not wait:
        raise UsageError("--timeout is only for --wait; add --wait, or leave --timeout out")
    limit = _duration(timeout or DEFAULT_DRAIN_TIMEOUT, "--timeout")
    _render(client.request(ctx, "cordon", CordonRequest(node=node, drain=True, grace=grace)),
            output, "drain")
    if not wait:
        return
    took, left = asyncio.run(_wait_drained(ctx, node, limit))
    if left:
        raise FleetwaveError(
            f"{node}: still draining after {format_duration(limit)}: {', '.join(left)}; the drain "
            "goes on ('fleetwave nodes -o json' shows each service's drain)")
    if output != "json":
        click.echo(safe(f"{node}: drained after {took:.1f}s: no router on it accepts or holds "
                        "a connection"))


def _duration(value: str, what: str) -> float:
    try:
        return parse_duration(value, what=what)
    except ProtocolError as exc:
        raise UsageError(str(exc)) from None


def drain_pending(row: dict[str, Any] | None) -> list[str]:
    """What keeps a node from counting as drained, from its ``nodes -o json`` row: each service
    whose last heartbeat does not say "drained" (with what it says), or the node itself when it
    is offline (its heartbeats cannot tell); [] when drained."""
    if row is None:
        return ["no such node in the node table"]
    if row.get("unheard"):
        return ["the node is not heard from yet (the coordinator has just started)"]
    if not row.get("online"):
        return ["the node is offline, so its routers cannot be asked"]
    services = row.get("services") or {}
    return [f"{name} ({(info or {}).get('drain') or 'not drained yet'})"
            for name, info in sorted(services.items())
            if (info or {}).get("drain") != "drained"]


async def _wait_drained(ctx: Ctx, node: str, limit: float) -> tuple[float, list[str]]:
    """Poll the node table until ``node`` is drained or ``limit`` passes: (seconds, what is
    left; [] when drained)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        rows = await client.call(ctx, "nodes", NodesRequest())
        row = next((r for r in rows if isinstance(r, dict) and r.get("id") == node), None) \
            if isinstance(rows, list) else None
        left = drain_pending(row)
        if not left or loop.time() - started >= limit:
            return loop.time() - started, left
        await asyncio.sleep(DRAIN_POLL)  # the heartbeats' pace; bounded by ``limit``
