"""``fleetwave cordon``, ``uncordon`` and ``drain``: holding nodes out for maintenance.

Each is one API request (``coordinator.api.cordons``); the coordinator checks the node or the
selector, so an unknown node or a selector matching nothing is one line and exit 2, and nothing
changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

import coordinator.cli.client as client
from coordinator.cli.base import Ctx, cli, output_option
from coordinator.cli.render import safe
from coordinator.core.fleet import parse_selector
from protocol.durations import format_duration, parse_duration
from protocol.errors import ProtocolError
from protocol.messages import CordonRequest

READY_PATH = "/.well-known/fleetwave/ready"  # agent.router.health; repeated for the help texts
DEFAULT_GRACE = "15s"


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
        state = ("drained" if row.get("drained") else "cordoned" if row.get("cordoned")
                 else "uncordoned")
        said = f"{row.get('node')}: {state}" + ("" if row.get("changed") else " (already)")
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
node (wait for it or abort it).
""")
@click.argument("node")
@click.option("--grace", default=DEFAULT_GRACE, show_default=True, callback=_grace,
              metavar="DUR", help="How long the readiness path answers 503 before the router "
              "stops accepting: at least your load balancer's interval x unhealthy threshold.")
@output_option
@click.pass_obj
def drain(ctx: Ctx, node: str, grace: float, output: str) -> None:
    _render(client.request(ctx, "cordon", CordonRequest(node=node, drain=True, grace=grace)),
            output, "drain")
