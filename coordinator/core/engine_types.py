"""The rollout engine's vocabulary: its events, its commands, and its state machine as data.

Everything that decides which events a rollout accepts and which states may follow which lives in
the two tables here, ``ACCEPTS`` and ``MOVES`` (after h11's ``_state.py``); ``core.engine``
applies them. Events and commands are frozen dataclasses: the runner builds events from bus
messages and timers, and carries out commands in order (``Persist`` first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import FleetwaveError
from protocol.messages import DesiredState, ObservedState, RolloutRecord

# -- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin the first wave."""


@dataclass(frozen=True)
class ObservedChanged:
    """A node's agent reported its observed state for the rollout's service."""

    node: str
    observed: ObservedState


@dataclass(frozen=True)
class NodeOffline:
    """The node missed its heartbeats."""

    node: str


@dataclass(frozen=True)
class NodeOnline:
    """The node beats again."""

    node: str


@dataclass(frozen=True)
class Tick:
    """Time passed: deadlines and bakes may have run out."""


@dataclass(frozen=True)
class Pause:
    reason: str = "paused by operator"


@dataclass(frozen=True)
class Resume:
    """Continue a paused rollout; a failed wave retries its failed nodes."""


@dataclass(frozen=True)
class Promote:
    """Skip the current bake and gates (``full``: of every remaining wave too)."""

    full: bool = False


@dataclass(frozen=True)
class Abort:
    """Stop here: no more writes, nodes stay as they are."""

    reason: str = "aborted by operator"


@dataclass(frozen=True)
class RollbackRequested:
    reason: str = "rollback requested by operator"


EngineEvent = (
    Start | ObservedChanged | NodeOffline | NodeOnline | Tick | Pause | Resume | Promote | Abort
    | RollbackRequested
)

# -- commands --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Persist:
    """Store the record (always the first command of a step that changed it)."""

    record: RolloutRecord


@dataclass(frozen=True)
class WriteDesired:
    """Write (sign and put) this desired state unless the stored one has a generation >= it."""

    desired: DesiredState


@dataclass(frozen=True)
class EmitEvent:
    """Publish a decision with its reason and figures."""

    kind: str
    message: str
    node: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    time: float | None = None  # when the engine decided (its ``now``); None: when published


Command = Persist | WriteDesired | EmitEvent


class IllegalTransition(FleetwaveError):
    """The rollout's state does not accept this request; nothing was changed."""


# -- the state machine, as data --------------------------------------------------------------------

_WATCH: frozenset[type] = frozenset({ObservedChanged, NodeOffline, NodeOnline, Tick})
ACCEPTS: dict[str, frozenset[type]] = {
    "pending": _WATCH | {Start, Abort},
    "running": _WATCH | {Pause, Promote, Abort, RollbackRequested},
    "rolling_back": _WATCH | {Abort},
    "paused": _WATCH | {Resume, Promote, Abort, RollbackRequested},
    "succeeded": frozenset(),
    "rolled_back": frozenset(),
    "failed": frozenset(),
    "aborted": frozenset(),
}
MOVES: dict[str, frozenset[str]] = {
    "pending": frozenset({"running", "aborted"}),
    "running": frozenset({"paused", "succeeded", "rolled_back", "failed", "aborted"}),
    "paused": frozenset({"running", "aborted"}),
    "succeeded": frozenset(),
    "rolled_back": frozenset(),
    "failed": frozenset(),
    "aborted": frozenset(),
}
VERBS: dict[type, str] = {
    Start: "start", Pause: "pause", Resume: "resume", Promote: "promote", Abort: "abort",
    RollbackRequested: "roll back", ObservedChanged: "observe", NodeOffline: "observe",
    NodeOnline: "observe", Tick: "tick",
}


def mode(record: RolloutRecord) -> str:
    """The key into ACCEPTS: the state, or ``rolling_back`` while a rollback runs."""
    if record.state == "running" and record.phase == "rollback":
        return "rolling_back"
    return record.state


def converged(seen: ObservedState, target: DesiredState) -> bool:
    """Whether a node has converged on ``target``: generation reached, traffic slots healthy and
    the weights applied as asked."""
    if seen.observed_generation < target.generation or seen.phase == "failed":
        return False
    for slot, weight in target.weights.items():
        status = seen.slots.get(slot)
        if weight > 0 and (status is None or status.status != "healthy"):
            return False
    return _positive(seen.weights) == _positive(target.weights)


def _positive(weights: Mapping[str, int]) -> dict[str, int]:
    return {s: w for s, w in weights.items() if w > 0}
