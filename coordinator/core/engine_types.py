"""The rollout engine's vocabulary: its events, its commands, and its state machine as data.

Everything that decides which events a rollout accepts and which states may follow which lives in
the tables here, ``ACCEPTS`` and ``MOVES`` for the rollout, ``WAVE_MOVES`` and ``NODE_MOVES`` for
its waves and target nodes (after h11's ``_state.py``); ``core.engine`` applies them. Events and
commands are frozen dataclasses: the runner builds events from bus messages and timers, and
carries out commands in order (``Persist`` first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# What reads a record's nodes lives in ``node_table`` (the strategies, which the CLI imports to
# check a spec, need it without the dataclasses here); the engine imports it from here as before.
from coordinator.core.node_table import NodeTable as NodeTable
from coordinator.core.node_table import converged as converged
from coordinator.core.node_table import old_slot_failing as old_slot_failing
from coordinator.core.node_table import peek as peek
from coordinator.core.node_table import peek_node as peek_node
from coordinator.core.node_table import settled as settled
from coordinator.errors import FleetwaveError
from protocol.messages import (
    DesiredState,
    NodeProgress,
    ObservedState,
    RolloutRecord,
    WaveRecord,
)

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


# Operator requests: ``who`` is the API caller (``protocol.subjects``); every event of the step
# that handles the request names it (``EmitEvent.who``).


@dataclass(frozen=True)
class Pause:
    reason: str = "paused by operator"
    who: str = ""


@dataclass(frozen=True)
class Resume:
    """Continue a paused rollout; a failed wave retries its failed nodes."""

    who: str = ""


@dataclass(frozen=True)
class Promote:
    """Skip the current bake and gates (``full``: of every remaining wave too)."""

    full: bool = False
    who: str = ""


@dataclass(frozen=True)
class Abort:
    """Stop here: no more writes, nodes stay as they are."""

    reason: str = "aborted by operator"
    who: str = ""


@dataclass(frozen=True)
class RollbackRequested:
    reason: str = "rollback requested by operator"
    who: str = ""


OperatorRequest = Pause | Resume | Promote | Abort | RollbackRequested


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
    who: str = ""  # who caused the decision (``protocol.messages.Event.who``)


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
# A wave: started, its nodes updating, then baked and judged. A failed wave is retried by a resume
# (``on_failure=pause``, then resume or promote); an inconclusive one is baked again by a resume.
WaveState = Literal["waiting", "updating", "baking", "passed", "failed", "inconclusive"]
WAVE_MOVES: dict[str, frozenset[str]] = {
    "waiting": frozenset({"updating"}),
    "updating": frozenset({"baking", "failed"}),
    "baking": frozenset({"passed", "failed", "inconclusive"}),
    "failed": frozenset({"updating"}),
    "inconclusive": frozenset({"baking"}),
    "passed": frozenset(),
}
# A target node: waiting for its wave (again, for a node in several waves: a canary's steps, a
# blue-green's stage then switch), updating, done; failed when it goes offline, reports failure
# or does not converge, and then retried (waiting) or rolled back with the rest.
NodeState = Literal["waiting", "updating", "done", "failed", "rolling_back", "rolled_back"]
NODE_MOVES: dict[str, frozenset[str]] = {
    "waiting": frozenset({"waiting", "updating", "done", "failed", "rolling_back"}),
    "updating": frozenset({"done", "failed", "rolling_back"}),
    "done": frozenset({"waiting", "failed", "rolling_back"}),
    "failed": frozenset({"waiting", "rolling_back"}),
    "rolling_back": frozenset({"rolled_back", "failed"}),
    "rolled_back": frozenset(),
}


def move_wave(wave: WaveRecord, to: WaveState) -> None:
    """Move ``wave`` to ``to`` if WAVE_MOVES has that row; else IllegalTransition, unchanged."""
    if to not in WAVE_MOVES[wave.state]:
        raise IllegalTransition(f"wave {wave.index}: no move from {wave.state} to {to}")
    wave.state = to


def move_node(progress: NodeProgress, to: NodeState) -> None:
    """Move a node to ``to`` if NODE_MOVES has that row; else IllegalTransition, unchanged."""
    if to not in NODE_MOVES[progress.state]:
        raise IllegalTransition(f"node {progress.node}: no move from {progress.state} to {to}")
    progress.state = to


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
