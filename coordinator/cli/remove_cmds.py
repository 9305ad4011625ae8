"""``fleetwave remove SERVICE``: take a service off the fleet, as a rollout.

The removal is a rollout of strategy ``remove`` (``coordinator.strategies.remove``): waves of
``--batch`` nodes within ``--max-unavailable``, each node given the signed empty desired state;
the agent closes the router (in-flight requests finish, new connections are refused), then stops
the slots, and keeps the release in its cache. It is followed like ``deploy``, with the same exit
codes; ``pause``, ``resume``, ``abort`` and ``rollback`` steer it as any rollout. A service that
no selected (online) node has is one line and exit 2: nothing to remove, nothing changed.
"""

from __future__ import annotations

import click

from coordinator import strategies
from coordinator.cli.base import Ctx, cli, output_option
from coordinator.cli.rollout_cmds import start
from coordinator.cli.waiting import wait_point
from coordinator.core.amounts import parse_amount
from coordinator.core.fleet import parse_selector
from coordinator.errors import UsageError
from protocol.durations import parse_duration
from protocol.messages import RolloutSpec


def removal_spec(
    service: str, *, selector: tuple[str, ...] = (), batch: str | None = None,
    max_unavailable: str | None = None, progress_deadline: str | None = None,
    on_failure: str | None = None,
) -> RolloutSpec:
    """The spec of ``fleetwave remove`` from its flags; UsageError says what is wrong."""
    spec = RolloutSpec(service=service, version="", strategy="remove",
                       selector=parse_selector(list(selector), what="--selector"))
    if batch is not None:
        parse_amount(batch, flag="--batch")
        spec.batch = batch
    if max_unavailable is not None:
        parse_amount(max_unavailable, flag="--max-unavailable")
        spec.max_unavailable = max_unavailable
    if progress_deadline is not None:
        spec.progress_deadline = parse_duration(progress_deadline, what="--progress-deadline")
    if on_failure is not None:
        if on_failure not in ("rollback", "pause"):
            raise UsageError(f"--on-failure {on_failure!r} is not one of rollback, pause")
        spec.on_failure = on_failure  # type: ignore[assignment]  # checked just above
    strategies.validate(spec)
    return spec


@cli.command()
@click.argument("service")
@click.option("--selector", multiple=True, metavar="KEY=VALUE",
              help="Only from nodes with this label (repeatable; all must match).")
@click.option("--batch", metavar="N|P%", help="Nodes per wave (default 1).")
@click.option("--max-unavailable", metavar="N|P%",
              help="Nodes being removed at once, at most (default 1).")
@click.option("--progress-deadline", metavar="DUR",
              help="Time for a wave's nodes to close their routers and stop (default 2m).")
@click.option("--on-failure", metavar="rollback|pause",
              help="A node that fails or misses the deadline: rollback (default: the removed "
                   "nodes run the service again) or pause.")
@click.option("--detach", is_flag=True, help="Print the rollout id and return at once.")
@click.option("--wait", type=click.Choice(("done", "started")), default=None,
              help="How far to follow: done (default: the removal ended or waits for an "
                   "operator) or started (the first wave is moving).")
@output_option
@click.pass_obj
def remove(ctx: Ctx, /, service: str, selector: tuple[str, ...], batch: str | None,
           max_unavailable: str | None, progress_deadline: str | None, on_failure: str | None,
           detach: bool, wait: str | None, output: str) -> int:
    """Remove SERVICE from the fleet (or the --selector nodes), in waves, and follow it.

    \b
    On each node the router stops taking connections, finishes the requests in flight and
    exits (new connections are then refused); the slots stop; the release stays in the node's
    cache, so a later deploy is fast. 'fleetwave rollback SERVICE' afterwards deploys the
    removed version again where it was removed.
    Exit codes as for deploy: 0 removed (or the --wait point passed; --detach: started), 1
    aborted or an error, 2 usage (also: no selected node has SERVICE), 3 rolled back (the
    service is back), 4 paused or failed, 5 recorded but its start not confirmed (--detach)."""
    spec = removal_spec(service, selector=selector, batch=batch, max_unavailable=max_unavailable,
                        progress_deadline=progress_deadline, on_failure=on_failure)
    return start(ctx, spec, wait=wait_point(spec, wait, detach=detach), detach=detach,
                 output=output)
