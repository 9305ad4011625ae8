"""Canary: move nodes step by step (``--steps``) and/or shift traffic by weight (``--weights``).

Formulas, for ``n`` selected nodes:

- ``--steps s1,s2,...,sk``: each step is a count or a percentage of ``n`` (percentages round up)
  and says how many nodes run the new release *in total* after that step; so wave ``i`` moves
  ``c_i - c_{i-1}`` nodes. Steps must strictly increase, none may exceed ``n``, and the last must
  reach every node (``100%`` or ``n``), or the rollout would never finish. Two steps that round to
  the same count (``1,5%`` over 10 nodes) are one wave.
- ``--weights w1,...,wm``: integer percentages 0-100, strictly increasing, the last 100. Every node
  of a weighted wave runs both slots and sends ``w`` percent of its traffic to the new one (of its
  *users* with ``--cohort-key``; a first 0 only serves ``--allow``-listed users).
- both: the nodes of the first step go through every weight in turn; later steps move fully.
- neither: ``1,100%`` (one canary node, then the rest).
"""

from __future__ import annotations

import itertools

from coordinator.core import staging
from coordinator.core.amounts import parse_amount
from coordinator.core.planning import Wave
from coordinator.errors import UsageError
from coordinator.strategies.waves import ORDINARY, Ordinary, every
from protocol.messages import RolloutSpec

DEFAULT_STEPS = ("1", "100%")


def check_steps(steps: list[str] | tuple[str, ...]) -> None:
    """What can be said of ``--steps`` without knowing the fleet: each item a count or a
    percentage in range, each kind strictly increasing, a last percentage of 100%. The CLI runs
    this before sending anything; ``step_counts`` says the rest once the nodes are known."""
    previous: dict[bool, tuple[str, float]] = {}
    amount = None
    for raw in steps:
        amount = parse_amount(raw, flag="--steps item")
        before = previous.get(amount.percent)
        if before is not None and amount.value <= before[1]:
            raise UsageError(
                f"--steps must strictly increase, but {raw} comes after {before[0]}; "
                "write them in growing order like 1,10%,50%,100%"
            )
        previous[amount.percent] = (raw, amount.value)
    if amount is not None and amount.percent and amount.value < 100:
        raise UsageError(
            f"--steps must end at 100% so that every node is moved, but the last step is "
            f"{steps[-1]}; add 100% at the end"
        )


def validate(spec: RolloutSpec) -> None:
    """``--steps`` and ``--weights`` as far as they can be judged without the fleet."""
    check_steps(spec.steps)
    parse_weights(spec.weights)


def wave(spec: RolloutSpec, index: int) -> Ordinary:
    """Every canary wave is an ordinary one (weighted or not)."""
    return ORDINARY


def prestage(spec: RolloutSpec) -> int:
    """None unless asked: a canary step exists to try the release on few hosts first, and
    staging starts it (and runs its ``pre_start`` hooks) on the next step's hosts before this
    step is judged. With ``--prestage N`` the nodes of the next N steps are staged; nodes
    that are in every wave (``--weights``) have nothing to stage."""
    return staging.waves_ahead(spec.prestage, 0)


def step_counts(steps: list[str] | tuple[str, ...], total: int) -> list[int]:
    """Cumulative node counts of ``--steps`` over ``total`` nodes; raise UsageError saying why."""
    counts: list[int] = []
    previous: tuple[str, float, bool] | None = None
    for raw in steps:
        amount = parse_amount(raw, flag="--steps item")
        count = amount.resolve(total, round_up=True)
        if not amount.percent and count > total:
            raise UsageError(
                f"--steps {raw} is more than the {total} selected nodes; use a count up to "
                f"{total} or a percentage"
            )
        if previous is not None:
            p_raw, p_value, p_percent = previous
            same_kind_not_up = p_percent == amount.percent and amount.value <= p_value
            if same_kind_not_up or (counts and count < counts[-1]):
                raise UsageError(
                    f"--steps must strictly increase, but {raw} comes after {p_raw}; "
                    "write them in growing order like 1,10%,50%,100%"
                )
        previous = (raw, amount.value, amount.percent)
        if not counts or count > counts[-1]:
            counts.append(count)
    if not counts or counts[-1] != total:
        last = steps[-1] if steps else "(none)"
        raise UsageError(
            f"--steps must end at 100% so that every node is moved, but the last step {last} "
            f"reaches {counts[-1] if counts else 0} of {total} nodes; add 100% at the end"
        )
    return counts


def parse_weights(weights: list[int] | tuple[int, ...]) -> list[int]:
    """Validate ``--weights``: 0-100, strictly increasing, ending at 100 (a first 0 stages the
    release for ``--allow``-listed users only; ``spec.check_cohort`` asks for the list)."""
    previous = -1
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 100:
            raise UsageError(
                f"--weights item {w!r} is out of range; each weight is a whole percentage 0-100"
            )
        if w <= previous:
            raise UsageError(
                f"--weights must strictly increase, but {w} comes after {previous}; "
                "write them like 5,25,100"
            )
        previous = w
    if weights and weights[-1] != 100:
        raise UsageError(
            f"--weights must end at 100 so that the new release takes all traffic, but the last "
            f"is {weights[-1]}; add 100 at the end"
        )
    return list(weights)


targets = every  # every selected node: a release goes to each


def plan(selected: list[str], spec: RolloutSpec) -> list[Wave]:
    """Waves of the canary: weighted waves over the first step's nodes, then one wave per step."""
    total = len(selected)
    weights = parse_weights(spec.weights)
    if spec.weights and not spec.steps:
        return [Wave(i, tuple(selected), w) for i, w in enumerate(weights)]
    counts = step_counts(spec.steps or list(DEFAULT_STEPS), total)
    waves: list[Wave] = []
    first = tuple(selected[: counts[0]])
    for w in weights or [100]:
        waves.append(Wave(len(waves), first, w))
    for lo, hi in itertools.pairwise(counts):
        waves.append(Wave(len(waves), tuple(selected[lo:hi])))
    return waves
