"""One module per strategy behind one ``Strategy`` Protocol (``base``); ``STRATEGIES`` maps names.

- ``base``  the ``Strategy`` and ``WavePolicy`` Protocols: what the engine may ask.
- ``rolling``, ``canary``, ``blue_green``, ``shadow``, ``remove``  one strategy each:
  ``validate(spec)``, ``targets(selected, current)``, ``plan(selected, spec)``, ``wave(spec,
  index)`` (the policy of each wave), and the wave policies it brings (blue-green's stage and
  switch, the shadow, the removal).
- ``waves``  the ordinary wave's policy, which the others start from.
- ``spec``  what every spec must hold (``validate`` runs it before the strategy's own checks).

May import ``protocol``, ``coordinator.errors`` and the core's planning, amounts, targets and
gates (the engine's ``Step`` for types only); never the runtime, the API or the CLI.

``plan(nodes, spec, current, cordoned, first)`` selects the nodes (``core.planning.select``),
holds the cordoned ones out (``core.planning.hold_out``), keeps the strategy's ``targets`` among
the rest (a removal: those that have the service), puts ``first`` at the front, and hands
them to
``plan_strategy(selected, spec)``, which dispatches on ``spec.strategy``. Every strategy returns
waves that together hold every selected node, each node's final wave with weight 100. The desired
state one node is given for a wave, a rollback or the retirement of its old slot is built by
``core.targets``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from coordinator.core.amounts import max_unavailable
from coordinator.core.planning import NodeLike, Wave, WaveKind, hold_out, select
from coordinator.errors import UsageError
from coordinator.strategies import blue_green, canary, remove, rolling, shadow
from coordinator.strategies.base import Strategy, WavePolicy
from coordinator.strategies.spec import check_common, check_version
from coordinator.strategies.waves import ORDINARY
from protocol.messages import DesiredState, RolloutSpec

STRATEGIES: dict[str, Strategy] = {
    "rolling": rolling, "canary": canary, "blue-green": blue_green, "shadow": shadow,
    "remove": remove,
}


def strategy(spec: RolloutSpec) -> Strategy:
    """The strategy ``spec`` names; UsageError if this coordinator has none of that name."""
    found = STRATEGIES.get(spec.strategy)
    if found is None:
        raise UsageError(
            f"strategy {spec.strategy!r} is not supported by this coordinator; "
            "use --strategy rolling, canary, blue-green or shadow"
        )
    return found


def removes(spec: RolloutSpec) -> bool:
    """Whether ``spec`` removes its service (``fleetwave remove``) rather than deploying a
    release: it names no version and its record's release has no digest."""
    return removes_strategy(spec.strategy)


def removes_strategy(name: str) -> bool:
    """``removes`` by the strategy's name (a rollout's summary keeps only that)."""
    return STRATEGIES.get(name) is remove


def validate(spec: RolloutSpec) -> None:
    """Refuse a spec before any fleet is known: what every spec must hold, then what its
    strategy needs. The CLI calls this before sending a deploy, the API before accepting one."""
    # --steps and --weights mean something to a canary only, but are refused as written whatever
    # the strategy, and first, as the CLI always has.
    canary.validate(spec)
    check_common(spec)
    if not removes(spec):
        check_version(spec)
    if (own := strategy(spec)) is not canary:
        own.validate(spec)


def wave_policies(spec: RolloutSpec, waves: int) -> list[WavePolicy]:
    """The policy of each of the ``waves`` waves of a rollout of ``spec`` (the strategy's
    ``wave``); ordinary waves for a strategy this coordinator does not know."""
    found = STRATEGIES.get(spec.strategy)
    if found is None:
        return [ORDINARY] * waves
    return [found.wave(spec, i) for i in range(waves)]


def waves_ahead(spec: RolloutSpec) -> int:
    """How many waves ahead a rollout of ``spec`` stages (its strategy's ``prestage``; none
    for a strategy this coordinator does not know)."""
    found = STRATEGIES.get(spec.strategy)
    return found.prestage(spec) if found is not None else 0


def wave_kind(spec: RolloutSpec, index: int) -> WaveKind:
    """What wave ``index`` of a rollout of ``spec`` is called (its policy's ``kind``)."""
    found = STRATEGIES.get(spec.strategy)
    return found.wave(spec, index).kind if found is not None else ""


def plan_strategy(selected: list[str], spec: RolloutSpec) -> list[Wave]:
    """The waves of ``spec.strategy`` over ``selected`` (already ordered, non-empty)."""
    return strategy(spec).plan(selected, spec)


def plan(
    nodes: Iterable[NodeLike], spec: RolloutSpec,
    current: Mapping[str, DesiredState] | None = None, cordoned: Collection[str] = (),
    first: Collection[str] = (),
) -> list[Wave]:
    """Select the target nodes of ``spec``, hold the ``cordoned`` ones out
    (``core.planning.hold_out``), keep the strategy's ``targets`` among the rest (``current``:
    each node's desired state of the service now) and cut them into waves with its strategy.
    The nodes in ``first`` (those unhealthy now: ``core.engine.new_record``) go to the front,
    in their order: they count against max-unavailable already, so the first waves take them,
    where a later wave would have them block every wave before it (a canary's too: with a
    budget of one, none of its healthy nodes could start). A step over such a node is judged
    by its new slot (``node_table.settled``)."""
    chosen = select(nodes, spec.selector)
    where = ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items())) or "(any)"
    if not chosen:
        raise UsageError(
            f"no node matches selector {where}; check the labels with "
            "'fleetwave nodes' or start an agent with matching --label"
        )
    selected, held = hold_out(chosen, cordoned)
    if not selected:
        raise UsageError(
            f"every node matching selector {where} is cordoned ({', '.join(held)}); "
            "return one with 'fleetwave uncordon NODE'"
        )
    selected = strategy(spec).targets(selected, spec, current or {})
    if first:
        selected = sorted(selected, key=lambda n: n not in first)  # stable: order kept
    max_unavailable(spec.max_unavailable, len(selected))  # every strategy honours it: check it now
    waves = plan_strategy(selected, spec)
    return [Wave(i, w.nodes, w.weight) for i, w in enumerate(waves)]
