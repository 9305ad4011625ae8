"""The engine's working step: the record being edited, the commands so far, and the primitives.

Theory of operation: ``Rollout.handle`` (``core.engine``) makes one ``Step`` per call over a
working copy of the record and the observed states; the step's methods edit that copy and append
commands, and the rollout commits the copy only if the whole call succeeds. The concerns of a
step are objects composed over it, each using only the ones below it:

    Step      (here) emitting, moving between states, writing desired states, failing a node,
              pausing, finishing: what every concern uses
    Rollback  (``engine_rollback``) a failed wave and the rollback phase
    Prestage  (``engine_prestage``) the nodes of the next waves staged at weight 0
    Lost      (``engine_lost``) nodes lost mid-wave, by the ``on_node_lost`` policy
    Bake      (``engine_bake``) the bake and the gates' verdict on it; a failure goes to Rollback
    Progress  (``engine_progress``) the events and forward progress through the waves

Where waves differ, the concerns ask the wave's policy (``strategies.base.WavePolicy``, one per
wave, given by the strategy: ``Step.policy``), never a strategy's name or a wave's kind; the
policies' hooks take a ``Step``, use only what is defined here, and keep their state in the
record's typed report (``protocol.report``), which the working copy holds as its own. Nothing
here awaits or reads a clock: time is ``now``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from coordinator.core.amounts import max_unavailable
from coordinator.core.engine_types import (
    MOVES,
    Command,
    EmitEvent,
    IllegalTransition,
    NodeTable,
    WriteDesired,
    move_node,
    peek,
)
from coordinator.core.targets import serves_unhealthy
from protocol.messages import (
    CohortTraffic,
    DesiredState,
    NodeProgress,
    ObservedState,
    RolloutRecord,
    RouterStats,
    WaveRecord,
)

if TYPE_CHECKING:  # the strategies import this module for its type; the engine asks them
    from coordinator.strategies.base import WavePolicy

# node -> (the observed state, target and previous state a verdict was reached on, by identity;
# whether the node converged on its target; whether that target keeps the new slot)
BackMemo = dict[str, tuple[ObservedState, DesiredState, DesiredState | None, bool, bool]]


@dataclass
class StageMemo:
    """What pre-staging's check keeps across steps (``engine_prestage.Prestage.check``): where
    each node of the staged window sits (wave, position), for the running wave it was made
    for, the earliest moment a staging node's deadline can pass (None: unknown, so the next
    check reads the whole window), and the nodes changed by steps since the last check (a step
    that did not check: a paused rollout's reports are judged when it resumes). A step works on
    a copy whose map and set it replaces, never changes in place: a step that fails leaves the
    engine's as it was."""

    running: int = -1
    place: dict[str, tuple[int, int]] = field(default_factory=dict)
    due: float | None = None
    pending: frozenset[str] = frozenset()


class Step:
    """The working state of one ``handle`` call: a copy of the record, and the commands so far."""

    def __init__(
        self, fleet: str, record: RolloutRecord, observed: dict[str, ObservedState], now: float,
        *, policies: Sequence[WavePolicy], who: str = "", ahead: int = 0,
        back_memo: BackMemo | None = None, down: set[str] | None = None,
        stage_memo: StageMemo | None = None, excused_until: float = 0.0,
    ) -> None:
        self.fleet = fleet
        self.excused_until = excused_until  # ``Rollout.excuse``: see ``passed``
        # The unavailable nodes of the committed record (kept by the engine across steps), or
        # None: ``unavailable`` scans the fleet then.
        self.down = down
        # The rollback's per-node verdicts, kept by the engine across steps (``Rollout``):
        # ``engine_rollback.Rollback.advance_rollback``.
        self.back_memo: BackMemo = {} if back_memo is None else back_memo
        self.stage_memo = StageMemo() if stage_memo is None else stage_memo
        self.who = who  # who caused this step: every event it emits names them
        self.r = record
        # What each node reports: the engine's own map, written through ``see`` (which keeps
        # what it replaced, for ``undo``): copying it for every step was O(fleet) a report.
        self.obs: Mapping[str, ObservedState] = observed
        self._obs = observed
        self._replaced: dict[str, ObservedState | None] = {}
        self.now = now
        self.spec = record.spec
        self.commands: list[Command] = []
        self._policies = policies  # one per wave, by index
        # Each distinct policy once, in wave order: the ones asked about the whole rollout.
        self.policies: tuple[WavePolicy, ...] = tuple(dict.fromkeys(policies))
        self.cap = max_unavailable(self.spec.max_unavailable, len(record.nodes))
        self.ahead = ahead  # waves staged ahead of the running one (``engine_prestage``)

    # -- helpers -----------------------------------------------------------------------------------

    def passed(self, deadline: float) -> bool:
        """Whether a progress deadline (a wave's, a staging node's, the rollback's, a lost
        node's) has passed: never before the fleet's excuse plus a whole
        ``--progress-deadline`` (``Rollout.excuse``: the nodes may not have heard the bus)."""
        if self.now < deadline:
            return False
        return not self.excused_until or (
            self.now >= self.excused_until + self.spec.progress_deadline)

    def emit(self, kind: str, message: str, node: str = "", **data: Any) -> None:
        self.commands.append(EmitEvent(kind, message, node, data, self.now, self.who))

    def move(self, to: str) -> None:
        if to not in MOVES[self.r.state]:  # a bug in this module, never an operator's mistake
            raise IllegalTransition(f"rollout {self.r.id}: no move from {self.r.state} to {to}")
        self.r.state = to  # type: ignore[assignment]  # checked against MOVES just above

    def next_generation(self, p: NodeProgress) -> int:
        seen = self.obs.get(p.node)
        p.generation = max(p.generation, seen.generation if seen else 0) + 1
        return p.generation

    def write(self, p: NodeProgress, desired: DesiredState) -> None:
        p.target = desired
        self.commands.append(WriteDesired(desired))

    def see(self, node: str, seen: ObservedState | None) -> None:
        """What ``node`` reports now (None: forget it), undone by ``undo``."""
        if node not in self._replaced:
            self._replaced[node] = self._obs.get(node)
        if seen is None:
            self._obs.pop(node, None)
        else:
            self._obs[node] = seen

    def changed(self) -> set[str]:
        """The nodes whose report or progress this step changed so far (reported, forgotten, or
        taken: ``NodeTable``)."""
        out = self.reported()
        if isinstance(self.r.nodes, NodeTable):
            out |= self.r.nodes.taken()
        else:
            out.update(self.r.nodes)
        return out

    def undo(self) -> None:
        """Put back what ``see`` changed (a step that failed changes nothing)."""
        for node, old in self._replaced.items():
            if old is None:
                self._obs.pop(node, None)
            else:
                self._obs[node] = old
        self._replaced.clear()

    def policy(self, wave: WaveRecord) -> WavePolicy:
        """What ``wave`` does, where waves differ."""
        return self._policies[wave.index]

    def reported(self) -> set[str]:
        """The nodes whose report this step changed (reported, or forgotten)."""
        return set(self._replaced)

    def unavailable(self) -> set[str]:
        """The target nodes without a healthy serving slot now (``down_why``). Only the nodes
        this step took (``NodeTable``) or heard from can have changed since the committed
        record, whose set the engine keeps (``down``): O(those), where a scan of every node was
        O(fleet) a step."""
        nodes, obs = self.r.nodes, self.obs
        if self.down is None or not isinstance(nodes, NodeTable):
            return {n for n, p in peek(nodes) if down_why(p, obs.get(n))}
        out = set(self.down)
        for n in nodes.taken() | self._replaced.keys():
            if n in nodes and down_why(dict.__getitem__(nodes, n), obs.get(n)):
                out.add(n)
            else:
                out.discard(n)
        return out

    def snapshot(self) -> dict[str, RouterStats]:
        """The routers' counters now, as a wave's baseline. A cohort rule's users sketches are
        left out (the gates read users from the latest reports only), which keeps the record
        small: they are a few KB a node."""
        return {n: _lean(o.router) for n, o in self.obs.items()
                if n in self.r.nodes and o.router is not None}

    def fail_node(self, p: NodeProgress, reason: str) -> None:
        move_node(p, "failed")
        p.reason = reason
        self.emit("node.failed", f"{p.node}: {reason}", p.node, reason=reason)

    def pause(self, reason: str) -> None:
        self.move("paused")
        self.r.reason, self.r.paused_by = reason, self.who
        self.emit("rollout.paused", f"paused: {reason}", wave=self.r.current_wave)

    def finish(self, state: str, reason: str) -> None:
        r = self.r
        self.move(state)
        r.reason, r.finished = reason, self.now
        if state == "aborted":
            r.aborted_by = self.who
        moved = sorted(n for n, p in peek(r.nodes)
                       if p.target is not None and p.state in ("done", "updating"))
        self.emit(f"rollout.{state}", f"{state.replace('_', ' ')}"
                  + (f": {reason}" if reason else f": {r.spec.service} "
                     f"{r.release.version or 'removed'} on {len(r.nodes)} nodes"),
                  reason=reason, moved=moved)


def _lean(stats: RouterStats) -> RouterStats:
    """``stats`` without its cohort users sketches (``snapshot``)."""
    if isinstance(stats.cohort, CohortTraffic) and stats.cohort.users:
        return msgspec.structs.replace(
            stats, cohort=msgspec.structs.replace(stats.cohort, users={}))
    return stats


def down_why(p: NodeProgress, seen: ObservedState | None) -> str:
    """Why a target node counts against max-unavailable, or "" if it does not: "updating",
    "failed", "offline", or "unhealthy" on its own (``targets.serves_unhealthy``). Such a node
    counts like one being updated, so that a rollout never takes more nodes out of service
    than max-unavailable allows with it; a wave still starts its own unhealthy nodes (they
    are down already, and the release may be their fix), and ``new_record`` puts the nodes
    unhealthy at the start in the first waves."""
    if p.state in ("updating", "failed"):
        return p.state
    if not p.online:
        return "offline"
    return "unhealthy" if serves_unhealthy(p, seen) else ""


def is_down(p: NodeProgress, seen: ObservedState | None) -> bool:
    """Whether a target node counts against max-unavailable (``down_why``)."""
    return bool(down_why(p, seen))
