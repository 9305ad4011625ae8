"""The rollout engine: a sans-IO state machine per rollout (after h11's ``_state.py``).

Theory of operation: ``Rollout.handle(event, now)`` takes one event (an operator request, a node's
observed state, a node going offline or online, a timer tick) and returns the commands that carry
out its decisions: ``Persist(record)`` first whenever the record changed, then ``WriteDesired`` and
``EmitEvent``. It never awaits, never reads a clock and never touches the bus; the runner does,
in that order, so a coordinator killed between two commands resumes from the persisted record and
re-issues its desired writes (idempotent by generation: ``Rollout.intended``).

Everything that decides which events a rollout accepts and which states follow which lives in the
two tables below, ``ACCEPTS`` and ``MOVES``. An event a state does not accept raises
IllegalTransition and leaves the rollout exactly as it was (``handle`` works on a copy and commits
only on success).

Vocabulary: the *mode* of a rollout is its state, except that a running rollout restoring its
touched nodes is in mode ``rolling_back``. A node is *touched* once a desired state was written for
it. A node is *unavailable* while it is being updated, has failed, is offline, or is unhealthy
on its own (``engine_step.down_why``); a node is only started when the number of unavailable
target nodes stays within max-unavailable, but for an unhealthy one (starting it takes nothing
more out of service). A node is *done* with a wave when it reports ``observed_generation`` at
least the written generation, a healthy new slot and the wave's weights applied (or, its old
slot not healthy, which its agent's convergence waits for, that generation seen with the new
slot healthy: ``node_table.settled``). It *fails* when it reports phase ``failed`` for that
generation (but for its old slot's failure alone) or has not converged by the wave's deadline;
one that goes offline while its wave is
in progress or baking is *lost*, and fails at once or is waited for up to the deadline, as the
rollout's ``on_node_lost`` says (``engine_lost``). When every node of a wave
is done the wave *bakes* for ``spec.bake`` seconds, and then, once every node's router counters
cover the whole bake (``window_covers_bake``), its gates (``coordinator.core.gates``) decide:
pass → next wave; fail → ``on_failure`` (rollback or pause); inconclusive → pause. Under
``--analysis sequential`` the evidence counts from the wave's start and a failure needs no bake:
it is weighed on every fresh report while the wave updates and bakes (``engine_bake``).
Rollback writes every touched node's previous desired state, each with a higher generation, in one
wave; it ends ``rolled_back`` when all converged back, or ``failed`` naming the nodes that did not
by the rollback deadline. Where waves differ (blue-green's stage and switch, the shadow, the
ordinary wave) the engine asks the wave's policy (``strategies.base.WavePolicy``, given per wave by
the strategy) at fixed points: wave start and convergence, node targets, bake and verdict, observed
states, success, rollback. Events, commands and the transition tables are in ``engine_types``.
One call works on a ``Step`` (its primitives, ``engine_step``) with four concerns composed over
it: ``Progress`` (``engine_progress``), ``Bake`` (``engine_bake``), ``Lost`` (``engine_lost``) and
``Rollback`` (``engine_rollback``).
Every event a step emits names who caused it (``cause``): the caller of an operator request,
whoever deployed the rollout for its start, else the coordinator itself; the record keeps who
started, paused, aborted or rolled it back (``started_by`` ... ``rollback_by``).
Observed states older (by their ``time``) than one already seen are stale
and ignored, so late and reordered reports cannot move a rollout backwards.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from coordinator.core.engine_bake import STATS_GRACE
from coordinator.core.engine_progress import Progress, reported
from coordinator.core.engine_step import BackMemo, StageMemo, Step, is_down
from coordinator.core.engine_types import (
    ACCEPTS,
    MOVES,
    VERBS,
    Abort,
    Command,
    EmitEvent,
    EngineEvent,
    IllegalTransition,
    NodeOffline,
    NodeOnline,
    NodeTable,
    ObservedChanged,
    OperatorRequest,
    Pause,
    Persist,
    Promote,
    Resume,
    RollbackRequested,
    Start,
    Tick,
    WriteDesired,
    converged,
    mode,
)
from coordinator.core.planning import NodeLike, hold_out, select
from coordinator.core.targets import cohort_for, forward_target, idle_slot, serving_slot
from coordinator.errors import UsageError
from coordinator.strategies import plan, wave_policies, waves_ahead
from protocol.codec import encode
from protocol.messages import (
    TERMINAL_STATES,
    DesiredState,
    NodeProgress,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
    RouterStats,
    WaveRecord,
)
from protocol.report import RolloutReport, ShadowReport
from protocol.subjects import COORDINATOR_CALLER

# The engine as callers see it: the vocabulary of engine_types is re-exported so one import does.
__all__ = [
    "ACCEPTS", "MOVES", "STATS_GRACE", "Abort", "Command", "EmitEvent", "EngineEvent",
    "IllegalTransition", "NodeOffline", "NodeOnline", "ObservedChanged", "Pause", "Persist",
    "Promote", "Resume", "RollbackRequested", "Rollout", "Start", "Step", "Tick", "WriteDesired",
    "cause", "converged", "mode", "new_record", "worst_case_sizes",
]


# -- creating a rollout ----------------------------------------------------------------------------


def new_record(
    *, id: str, spec: RolloutSpec, release: ReleaseRef, nodes: Iterable[NodeLike],
    current: Mapping[str, DesiredState], now: float, who: str = "",
    cordoned: Collection[str] = (), undo: bool = False,
    observed: Mapping[str, ObservedState] | None = None,
) -> RolloutRecord:
    """Plan ``spec`` over ``nodes`` and record each target node's current desired state; the
    selected nodes in ``cordoned`` are skipped and named in ``report.skipped_cordoned``.
    ``observed``: each node's latest report of the service, whose health and version the
    record starts with (as ``ObservedChanged`` would set them: the same reports fed to the new
    rollout then change nothing, and its first wave's write holds that wave's pages, not every
    page); ``from_version`` stays the desired states' (what the nodes were told to run)."""
    if release.service != spec.service or release.version != spec.version:
        raise UsageError(
            f"release {release.service} {release.version} does not match the rollout of "
            f"{spec.service} {spec.version}; push the release first with 'fleetwave release push'"
        )
    nodes = list(nodes)
    # Each reporting node's health and version by its latest report (``reported``): the
    # record starts with them, and the nodes meant to serve that report no healthy serving
    # slot count against max-unavailable (``engine_step.down_why``), so they go first.
    said: dict[str, tuple[bool, str]] = {}
    unhealthy: set[str] = set()
    for node, seen in (observed or {}).items():
        if seen.node != node or seen.service != spec.service:
            continue
        previous = current.get(node)
        serving = serving_slot(previous)
        known = previous.slots[serving].version if previous and serving else ""
        said[node] = healthy_version = reported(seen, known)
        if serving is not None and not healthy_version[0]:
            unhealthy.add(node)
    waves = plan(nodes, spec, current, cordoned, first=unhealthy)
    progress: dict[str, NodeProgress] = {}
    # What the rollout comes from is what the coordinator last wanted of each node, never what
    # a node says it runs: ``rollback SERVICE`` deploys it again (``core.history``).
    versions: Counter[str] = Counter()
    for wave in waves:
        for node in wave.nodes:
            if node in progress:
                continue
            previous = current.get(node)
            serving = serving_slot(previous)
            version = previous.slots[serving].version if previous and serving else ""
            if version:
                versions[version] += 1
            healthy, version = said.get(node, (False, version))
            progress[node] = NodeProgress(
                node=node, previous=previous, generation=previous.generation if previous else 0,
                version=version, healthy=healthy,
            )
    record = RolloutRecord(
        id=id, spec=spec, release=release, state="pending", created=now, updated=now,
        from_version=versions.most_common(1)[0][0] if versions else "",
        waves=[WaveRecord(index=w.index, nodes=list(w.nodes), weight=w.weight) for w in waves],
        nodes=progress, started_by=who, prestage=min(waves_ahead(spec), len(waves) - 1),
        undo=undo,
    )
    if cordoned and (held := hold_out(select(nodes, spec.selector), cordoned)[1]):
        record.report.skipped_cordoned = held
    return record


def worst_case_sizes(record: RolloutRecord, routers: Mapping[str, RouterStats]
                     ) -> tuple[int, dict[str, int]]:
    """Bytes a new rollout's record can reach, as the head and per node (``core.pages``): each
    node with a two-slot target, its router's counters (``routers``: the latest per node) in two
    wave baselines and, under sequential analysis, in the running wave's ``evidence_from``, and
    its place in each wave it belongs to."""
    memberships: Counter[str] = Counter(n for w in record.waves for n in w.nodes)
    snapshots = 3 if record.spec.gates.analysis == "sequential" else 2
    sizes: dict[str, int] = {}
    for n, p in record.nodes.items():
        worst = msgspec.structs.replace(p, target=forward_target(
            p.previous, fleet="", node=n, release=record.release, slot=idle_slot(p.previous),
            weight=100, generation=p.generation + 1, rollout=record.id, now=record.created,
            cohort=cohort_for(record.spec, slot="a", rollout=record.id, weight=0)))
        stats = routers.get(n)
        per_stats = len(encode(stats)) + len(n) + 8 if stats is not None else 0
        sizes[n] = (len(encode(worst)) + len(n) + 8 + snapshots * per_stats
                    + memberships[n] * (len(n) + 16))
    top = msgspec.structs.replace(
        record, nodes={}, pages=len(record.nodes), node_count=len(record.nodes),
        waves=[msgspec.structs.replace(w, nodes=[], baseline={}) for w in record.waves])
    # The report stays in the head: a blue-green's holds every node's switch time, switch-back
    # time and name (``protocol.report.Switch``, ``SwitchBack``), which bounds its fleet.
    per_node = 0
    if "blue-green" in (record.spec.strategy, record.spec.then):
        per_node = sum(3 * len(n) + 60 for n in record.nodes)
    return len(encode(top)) + per_node, sizes


# -- the machine -----------------------------------------------------------------------------------


class Rollout:
    """One rollout: its persisted record plus the latest observed state of each target node.

    Observed states are not persisted: after a restart the runner feeds the current ones again
    (a KV watch delivers every current value first), which is all a level-triggered engine needs.
    """

    def __init__(self, record: RolloutRecord, *, fleet: str) -> None:
        self.fleet = fleet
        self._record = record
        self._observed: dict[str, ObservedState] = {}
        self._policies = wave_policies(record.spec, len(record.waves))
        self._back_memo: BackMemo = {}  # the rollback's verdicts, across steps (``Step``)
        # The committed record's unavailable nodes (``Step.unavailable``), made at the first
        # step and kept up to date with the nodes each step took or heard from.
        self._down: set[str] | None = None
        # The nodes any step took since the record was last persisted (``persisted``): the
        # only ones whose progress can differ from it, so the store compares only those.
        self.touched: set[str] = set()
        self._stage_memo = StageMemo()  # pre-staging's, across steps (``Step``)
        self.excused_until = 0.0  # see ``excuse``

    def excuse(self, until: float) -> None:
        """The nodes may not have heard the bus until ``until``: the leader's connection was
        down (so were the agents', or the leader could not hear them), and an agent's watch of
        its desired states starts again within the fleet's restart spread after it reconnects.
        No progress deadline of this rollout passes before ``until`` plus a whole
        ``--progress-deadline``, as if every node had been told its desired state then
        (``Step.passed``); a node's own failure still fails it at once. Not persisted: a
        leader that resumes the rollout excuses it as long from its bus's last reconnect."""
        self.excused_until = max(self.excused_until, until)

    def persisted(self, record: RolloutRecord) -> None:
        """``record`` is stored: if it is this rollout's current revision, no node differs
        from what is stored (an older one leaves ``touched`` as it is: a superset is safe)."""
        if record.revision == self._record.revision:
            self.touched.clear()

    @property
    def record(self) -> RolloutRecord:
        """The current record; treat it as read-only (the engine replaces it, never edits it)."""
        return self._record

    @property
    def state(self) -> str:
        return self._record.state

    @property
    def done(self) -> bool:
        return self._record.state in TERMINAL_STATES

    def intended(self) -> list[DesiredState]:
        """Every desired state this rollout decided on, for the runner to (re)write on resume."""
        return [p.target for p in self._record.nodes.values() if p.target is not None]

    def handle(self, event: EngineEvent, now: float) -> list[Command]:
        """Apply ``event`` at time ``now``; return the commands, Persist first if anything changed.

        Raises IllegalTransition (and changes nothing) if the rollout's mode does not accept it.
        """
        current = mode(self._record)
        if type(event) not in ACCEPTS[current]:
            raise IllegalTransition(
                f"cannot {VERBS[type(event)]} rollout {self._record.id}: it is "
                f"{current.replace('_', ' ')}"
                + (f" ({self._record.reason})" if self._record.reason else "")
            )
        return self._step([event], now, who=cause(event, self._record))

    def handle_all(self, events: Sequence[EngineEvent], now: float) -> list[Command]:
        """Apply several feed events (observed states, offline/online, ticks) at once, at ``now``.

        The engine is level-triggered, so deciding once on the latest of everything reported is
        what handling them one by one decides by the last one, at one decode, one encode and one
        Persist instead of one each: the runner batches what arrives while it is busy, which keeps
        a wave of N nodes O(N) instead of O(N^2). Raises IllegalTransition (and changes nothing)
        if one of them is not a feed event or the rollout's mode does not accept it.
        """
        current = mode(self._record)
        for event in events:
            if not isinstance(event, FEED_EVENTS) or type(event) not in ACCEPTS[current]:
                raise IllegalTransition(
                    f"cannot {VERBS[type(event)]} rollout {self._record.id} in a batch: it is "
                    f"{current.replace('_', ' ')}")
        return self._step(events, now, who=COORDINATOR_CALLER) if events else []

    def _step(self, events: Sequence[EngineEvent], now: float, *, who: str) -> list[Command]:
        work = working_copy(self._record)
        if self._down is None:
            self._down = {n for n, p in self._record.nodes.items()
                          if is_down(p, self._observed.get(n))}
        step = Step(self.fleet, work, self._observed, now, policies=self._policies, who=who,
                    ahead=self._record.prestage, back_memo=self._back_memo, down=self._down,
                    stage_memo=dataclasses.replace(self._stage_memo),
                    excused_until=self.excused_until)
        progress = Progress(step)
        try:
            for event in events:
                progress.apply(event)
            progress.advance()
        except BaseException:
            step.undo()  # what the nodes reported stays as it was before the step
            raise
        commands: list[Command] = list(step.commands)
        memo = self._stage_memo = step.stage_memo
        if work.phase == "rollback" or work.state in TERMINAL_STATES:
            memo.pending = frozenset()  # no check runs again
        else:
            memo.pending = memo.pending | step.changed()
            if len(memo.pending) > len(memo.place):  # a paused rollout's reports: read it all
                memo.pending, memo.due = frozenset(), None
        taken = work.nodes.taken() if isinstance(work.nodes, NodeTable) else None
        if taken is None:
            self._down = None  # made again at the next step
            self.touched.update(work.nodes)
        else:
            self.touched |= taken
            for n in taken | step.reported():
                if n in work.nodes and is_down(dict.__getitem__(work.nodes, n),
                                               self._observed.get(n)):
                    self._down.add(n)
                else:
                    self._down.discard(n)
        work.nodes = dict(work.nodes)  # the committed record's: reading it copies nothing
        # Field-by-field equality: what the copy shares with the committed record (desired
        # states, router snapshots, the nodes the step never took) compares by identity, so
        # this is O(nodes) pointer checks instead of encoding the whole record twice per step.
        if work != self._record:
            work.revision += 1
            work.updated = now
            commands.insert(0, Persist(work))
        self._record = work
        return commands


FEED_EVENTS = (ObservedChanged, NodeOffline, NodeOnline, Tick)


def cause(event: EngineEvent, record: RolloutRecord) -> str:
    """Who a step handling ``event`` acts for: the caller of an operator request, whoever
    deployed the rollout for its start (also when a resumed coordinator starts it), and the
    coordinator itself for what it observes and for time passing."""
    if isinstance(event, OperatorRequest):
        return event.who
    if isinstance(event, Start):
        return record.started_by
    return COORDINATOR_CALLER


def working_copy(record: RolloutRecord) -> RolloutRecord:
    """A copy of ``record`` that a Step may edit without touching the committed one.

    Every container a Step could edit in place is the copy's own: each wave (its ``nodes`` list,
    its ``gates`` figures deeply, its ``baseline`` and ``evidence_from`` dicts), each
    NodeProgress the Step takes (``NodeTable`` copies it then; ``peek`` reads without taking),
    and the report's parts. What a Step only ever replaces whole is shared: the
    ``previous`` and ``target`` desired states of a node and the router snapshots in a baseline.
    Copying the baselines deeply was most of a step's cost once routers report counters (a
    snapshot of every node per wave), and a full decode of the record was before that.
    """
    return msgspec.structs.replace(
        record,
        waves=[msgspec.structs.replace(
            w, nodes=list(w.nodes), gates=_deep(w.gates), baseline=dict(w.baseline),
            evidence_from=w.evidence_from if w.evidence_from is msgspec.UNSET
            else dict(w.evidence_from)) for w in record.waves],
        report=_copy_report(record.report),
        nodes=NodeTable(record.nodes),
    )


def _deep(value: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of plain JSON-like data (msgpack round trip: the fastest deep copy)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value)) if value else {}


def _copy_report(report: RolloutReport) -> RolloutReport:
    """A deep copy of a report: each part's containers copied at C speed, the shadow's (small,
    nested) by a typed msgpack round trip. A round trip of the whole report was 4 % of a
    10,000-node blue-green rollback's coordinator: its switch maps name every node, and every
    step copies the report."""
    switch, back, window, shadow = (report.switch, report.switch_back, report.old_window,
                                    report.shadow)
    replace = msgspec.structs.replace
    return replace(
        report,
        skipped_offline=_listed(report.skipped_offline),
        skipped_cordoned=_listed(report.skipped_cordoned),
        shadow=shadow if shadow is UNSET else msgspec.msgpack.decode(
            msgspec.msgpack.encode(shadow), type=ShadowReport),
        switch=switch if switch is UNSET else replace(
            switch, nodes=dict(switch.nodes), old=replace(
                switch.old, latency=list(switch.old.latency),
                untrusted=dict(switch.old.untrusted))),
        switch_back=back if back is UNSET else replace(
            back, nodes=dict(back.nodes), expect=list(back.expect)),
        old_window=window if window is UNSET else replace(window, latency=list(window.latency)),
    )


def _listed(value: list[str] | UnsetType) -> list[str] | UnsetType:
    return value if value is UNSET else list(value)
