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
it. A node is *unavailable* while it is being updated, has failed, or is offline; a node is only
started when the number of unavailable target nodes stays within max-unavailable. A node is *done*
with a wave when it reports ``observed_generation`` at least the written generation, a healthy new
slot and the wave's weights applied. It *fails* when it reports phase ``failed`` for that
generation, goes offline, or has not converged by the wave's deadline. When every node of a wave
is done the wave *bakes* for ``spec.bake`` seconds, and then, once every node's router counters
cover the whole bake (``window_covers_bake``), its gates (``coordinator.gates``) decide:
pass → next wave; fail → ``on_failure`` (rollback or pause); inconclusive → pause.
Rollback writes every touched node's previous desired state, each with a higher generation, in one
wave; it ends ``rolled_back`` when all converged back, or ``failed`` naming the nodes that did not
by the rollback deadline. Blue-green and shadow add kinds of waves (``strategies.wave_kind``:
stage, shadow, switch) whose phase logic lives in ``strategies.blue_green`` and
``strategies.shadow``; the engine calls them at fixed points (wave start and convergence, bake
verdict, success, rollback). Events, commands and the transition tables are in ``engine_types``.
Observed states older (by their ``time``) than one already seen are stale
and ignored, so late and reordered reports cannot move a rollout backwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from coordinator import gates as gatelib
from coordinator.engine_types import (
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
    ObservedChanged,
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
from coordinator.errors import UsageError
from coordinator.planning import NodeLike, max_unavailable, plan
from coordinator.strategies import (
    WaveKind,
    blue_green,
    forward_target,
    idle_slot,
    restore_target,
    retire_target,
    runs,
    serving_slot,
    shadow,
    wave_kind,
)
from protocol.durations import format_duration
from protocol.messages import (
    TERMINAL_STATES,
    DesiredState,
    Gates,
    NodeProgress,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
    RouterStats,
    WaveRecord,
)

# How long past its end a bake waits for router counters that cover it (window_covers_bake)
# before its gates judge what they have; agents read the counters every 2 s.
STATS_GRACE = 10.0

# Everything the runner and the tests import from here, wherever it is defined.
__all__ = [
    "ACCEPTS", "MOVES", "Abort", "Command", "EmitEvent", "EngineEvent", "IllegalTransition",
    "NodeOffline", "NodeOnline", "ObservedChanged", "Pause", "Persist", "Promote", "Resume",
    "RollbackRequested", "Rollout", "Start", "Step", "Tick", "WriteDesired", "converged", "mode",
    "new_record",
]


# -- creating a rollout ----------------------------------------------------------------------------


def new_record(
    *, id: str, spec: RolloutSpec, release: ReleaseRef, nodes: Iterable[NodeLike],
    current: Mapping[str, DesiredState], now: float,
) -> RolloutRecord:
    """Plan ``spec`` over ``nodes`` and record each target node's current desired state."""
    if release.service != spec.service or release.version != spec.version:
        raise UsageError(
            f"release {release.service} {release.version} does not match the rollout of "
            f"{spec.service} {spec.version}; push the release first with 'fleetwave release push'"
        )
    waves = plan(nodes, spec)
    progress: dict[str, NodeProgress] = {}
    for wave in waves:
        for node in wave.nodes:
            if node in progress:
                continue
            previous = current.get(node)
            serving = serving_slot(previous)
            version = previous.slots[serving].version if previous and serving else ""
            progress[node] = NodeProgress(
                node=node, previous=previous, generation=previous.generation if previous else 0,
                version=version,
            )
    versions = Counter(p.version for p in progress.values() if p.version)
    return RolloutRecord(
        id=id, spec=spec, release=release, state="pending", created=now, updated=now,
        from_version=versions.most_common(1)[0][0] if versions else "",
        waves=[WaveRecord(index=w.index, nodes=list(w.nodes), weight=w.weight) for w in waves],
        nodes=progress,
    )


# -- the machine -----------------------------------------------------------------------------------


class Rollout:
    """One rollout: its persisted record plus the latest observed state of each target node.

    Observed states are not persisted: after a restart the runner feeds the current ones again
    (a KV watch delivers every current value first), which is all a level-triggered engine needs.
    """

    def __init__(self, record: RolloutRecord, *, fleet: str) -> None:
        self.fleet = fleet
        self._record = record
        self._encoded = msgspec.msgpack.encode(record)  # of the committed record, to spot changes
        self._observed: dict[str, ObservedState] = {}

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
        return self._step([event], now)

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
        return self._step(events, now) if events else []

    def _step(self, events: Sequence[EngineEvent], now: float) -> list[Command]:
        work = working_copy(self._record)
        observed = dict(self._observed)
        step = Step(self.fleet, work, observed, now)
        for event in events:
            step.apply(event)
        step.advance()
        commands: list[Command] = list(step.commands)
        encoded = msgspec.msgpack.encode(work)
        if encoded != self._encoded:
            work.revision += 1
            work.updated = now
            commands.insert(0, Persist(work))
            encoded = msgspec.msgpack.encode(work)
        self._record, self._encoded = work, encoded
        self._observed = observed
        return commands


FEED_EVENTS = (ObservedChanged, NodeOffline, NodeOnline, Tick)


def working_copy(record: RolloutRecord) -> RolloutRecord:
    """A copy of ``record`` that a Step may edit without touching the committed one.

    Deep where the engine edits in place (the waves, with their gates and baselines, and the
    report's nested dicts; decoded from msgpack, the fastest deep copy), shallow per node: a
    Step sets a NodeProgress's fields but replaces its ``previous`` and ``target`` desired states
    whole and never edits them, so they are shared. A full decode of the record was most of a
    step's cost (40 ms of a 3.6 MB record at 5,000 nodes, every tick and every batch).
    """
    return msgspec.structs.replace(
        record,
        waves=msgspec.msgpack.decode(msgspec.msgpack.encode(record.waves), type=list[WaveRecord]),
        report=msgspec.msgpack.decode(msgspec.msgpack.encode(record.report)),
        nodes={n: msgspec.structs.replace(p) for n, p in record.nodes.items()},
    )


class Step:
    """The working state of one ``handle`` call: a copy of the record, and the commands so far."""

    def __init__(
        self, fleet: str, record: RolloutRecord, observed: dict[str, ObservedState], now: float,
    ) -> None:
        self.fleet = fleet
        self.r = record
        self.obs = observed
        self.now = now
        self.spec = record.spec
        self.commands: list[Command] = []
        self.cap = max_unavailable(self.spec.max_unavailable, len(record.nodes))

    # -- helpers -----------------------------------------------------------------------------------

    def emit(self, kind: str, message: str, node: str = "", **data: Any) -> None:
        self.commands.append(EmitEvent(kind, message, node, data))

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

    def kind(self, wave: WaveRecord) -> WaveKind:
        return wave_kind(self.spec, wave.index)

    def unavailable(self) -> set[str]:
        return {
            n for n, p in self.r.nodes.items()
            if p.state in ("updating", "failed") or not p.online
        }

    # -- events ------------------------------------------------------------------------------------

    def apply(self, event: EngineEvent) -> None:
        r = self.r
        match event:
            case Start():
                self.move("running")
                self.emit(
                    "rollout.started",
                    f"rolling {r.spec.service} from {r.from_version or '(nothing)'} to "
                    f"{r.release.version} on {len(r.nodes)} nodes in {len(r.waves)} waves "
                    f"({r.spec.strategy}, max-unavailable {self.cap})",
                    strategy=r.spec.strategy, nodes=len(r.nodes), waves=len(r.waves),
                    max_unavailable=self.cap,
                )
            case ObservedChanged(node=node, observed=seen):
                self.observe(node, seen)
            case NodeOffline(node=node) | NodeOnline(node=node):
                p = r.nodes.get(node)
                online = isinstance(event, NodeOnline)
                if p is not None and p.online != online:
                    p.online = online
                    kind = "node.online" if online else "node.offline"
                    self.emit(f"rollout.{kind}", f"target node {node} is "
                              f"{'back online' if online else 'offline'}", node)
            case Tick():
                pass
            case Pause(reason=reason):
                self.pause(reason)
            case Resume():
                self.resume()
            case Promote(full=full):
                r.promote = "full" if full else "step"
                what = "every remaining bake and gate" if full else "this wave's bake and gates"
                self.emit("rollout.promoted", f"promoted: skipping {what}", full=full)
                if r.state == "paused":
                    self.resume()
            case Abort(reason=reason):
                self.finish("aborted", reason)
            case RollbackRequested(reason=reason):
                if r.state == "paused":
                    self.move("running")
                self.start_rollback(reason)

    def observe(self, node: str, seen: ObservedState) -> None:
        p = self.r.nodes.get(node)
        if p is None or seen.node != node or seen.service != self.spec.service:
            return  # not ours, or a payload claiming another key: the runner logs it
        last = self.obs.get(node)
        if last is not None and seen.time < last.time:
            return  # a late report: a newer one was already seen
        self.obs[node] = seen
        healthy = any(
            w > 0 and (s := seen.slots.get(slot)) is not None and s.status == "healthy"
            for slot, w in seen.weights.items()
        )
        serving = max(seen.weights, key=lambda s: seen.weights[s], default=None)
        version = seen.slots[serving].version if serving in seen.slots else p.version
        if (p.healthy, p.version) != (healthy, version):
            p.healthy, p.version = healthy, version
        blue_green.note(self, p, seen)

    # -- operator requests -------------------------------------------------------------------------

    def pause(self, reason: str) -> None:
        self.move("paused")
        self.r.reason = reason
        self.emit("rollout.paused", f"paused: {reason}", wave=self.r.current_wave)

    def resume(self) -> None:
        r = self.r
        self.move("running")
        r.reason = ""
        wave = r.waves[r.current_wave]
        if wave.state == "failed":
            retried = []
            for n in wave.nodes:
                p = r.nodes[n]
                if p.state == "waiting":
                    p.reason = ""
                elif p.state == "failed":
                    p.state, p.reason = "waiting", ""
                    retried.append(n)
                    if p.online and p.target is not None:
                        # Written and failed: already counted as unavailable, so a retry costs
                        # nothing; nodes never written wait for capacity like any other.
                        self.start_node(p, wave)
            wave.state = "updating"
            wave.deadline = self.now + self.spec.progress_deadline
            self.emit("rollout.resumed", f"resumed: retrying wave {wave.index}",
                      wave=wave.index, retried=retried)
            return
        if wave.state == "inconclusive":
            self.start_bake(wave)
        elif wave.state == "updating":
            wave.deadline = self.now + self.spec.progress_deadline
        self.emit("rollout.resumed", f"resumed at wave {wave.index}", wave=wave.index)

    # -- forward progress --------------------------------------------------------------------------

    def advance(self) -> None:
        """Move as far as what is known allows (level-triggered: safe to run after any event)."""
        r = self.r
        if r.state != "running":
            return
        if r.phase == "rollback":
            self.advance_rollback()
            return
        while True:
            wave = r.waves[r.current_wave]
            if wave.state == "waiting":
                self.start_wave(wave)
            if wave.state == "updating":
                self.update_wave(wave)
            if wave.state == "baking":
                self.bake(wave)
            if wave.state != "passed":
                return
            if r.current_wave + 1 >= len(r.waves):
                if not blue_green.keep_warm(self):
                    self.succeed()
                return
            r.current_wave += 1

    def start_wave(self, wave: WaveRecord) -> None:
        wave.state = "updating"
        wave.started = self.now
        wave.deadline = self.now + self.spec.progress_deadline
        for n in wave.nodes:
            p = self.r.nodes[n]
            p.wave, p.state, p.reason = wave.index, "waiting", ""
        kind = self.kind(wave)
        if kind in ("stage", "shadow"):
            # The previous wave's traffic window starts here (blue_green.start_switch uses it).
            wave.baseline = self.snapshot()
        self.emit("wave.started", f"wave {wave.index}: {len(wave.nodes)} nodes at weight "
                  f"{wave.weight}%" + (f" ({kind})" if kind else ""), wave=wave.index,
                  nodes=wave.nodes, weight=wave.weight, wave_kind=kind)
        if kind == "switch":
            blue_green.start_switch(self, wave.index)

    def start_node(self, p: NodeProgress, wave: WaveRecord) -> None:
        if not p.slot:
            p.slot = idle_slot(p.previous)
        desired = forward_target(
            p.previous, fleet=self.fleet, node=p.node, release=self.r.release, slot=p.slot,
            weight=wave.weight, generation=self.next_generation(p), rollout=self.r.id,
            now=self.now,
            mirror=shadow.mirror_spec(self.spec, p.slot) if self.kind(wave) == "shadow" else None,
        )
        p.state = "updating"
        self.write(p, desired)
        self.emit("node.updating", f"{p.node}: {self.r.release.version} in slot {p.slot} at "
                  f"weight {wave.weight}% (generation {p.generation})", p.node,
                  generation=p.generation, slot=p.slot, weight=wave.weight)

    def fail_node(self, p: NodeProgress, reason: str) -> None:
        p.state, p.reason = "failed", reason
        self.emit("node.failed", f"{p.node}: {reason}", p.node, reason=reason)

    def update_wave(self, wave: WaveRecord) -> None:
        r = self.r
        for n in wave.nodes:
            p = r.nodes[n]
            if p.state == "updating":
                self.check_node(p)
        unavailable = self.unavailable()
        # Staging at weight 0 and switching to a staged healthy slot stop no node from serving,
        # so only ordinary waves are bounded by max-unavailable.
        kind = self.kind(wave)
        capped = kind == ""
        blocked: list[str] = []
        for n in wave.nodes:
            p = r.nodes[n]
            if p.state != "waiting":
                continue
            if (p.target is None and (wave.weight == 100 or kind in ("stage", "shadow"))
                    and runs(p.previous, r.release)):
                p.state = "done"
                self.emit("node.done", f"{n}: already runs {r.release.version}", n)
            elif not p.online:
                self.fail_node(p, "node is offline")
            elif not capped or len(unavailable) + (n not in unavailable) <= self.cap:
                self.start_node(p, wave)
                unavailable.add(n)
            else:
                blocked.append(n)
        failed = [r.nodes[n] for n in wave.nodes if r.nodes[n].state == "failed"]
        if not failed and self.now >= wave.deadline:
            limit = format_duration(self.spec.progress_deadline)
            for n in wave.nodes:
                p = r.nodes[n]
                if p.state == "updating":
                    seen = self.obs.get(n)
                    got = seen.observed_generation if seen else "none"
                    self.fail_node(p, f"did not converge within {limit} (observed generation "
                                      f"{got}, wanted {p.generation})")
                    failed.append(p)
                elif p.state == "waiting":
                    # Never started, so not disrupted: it stays waiting (and does not count as
                    # unavailable), but the wave cannot pass without it.
                    p.reason = (f"could not start within {limit}: {len(unavailable)} target "
                                f"nodes unavailable (max-unavailable {self.cap})")
                    failed.append(p)
        if failed:
            wave.state = "failed"
            wave.finished = self.now
            why = "; ".join(f"{p.node}: {p.reason}" for p in failed)
            self.on_failure(wave, f"wave {wave.index} failed: {why}")
            return
        if all(r.nodes[n].state == "done" for n in wave.nodes):
            self.emit("wave.converged", f"wave {wave.index}: all {len(wave.nodes)} nodes "
                      "converged", wave=wave.index)
            if kind == "switch":
                blue_green.switched(self, wave.index)
            self.start_bake(wave)

    def check_node(self, p: NodeProgress) -> None:
        seen = self.obs.get(p.node)
        if not p.online:
            self.fail_node(p, "node went offline")
        elif seen is not None and seen.generation >= p.generation and seen.phase == "failed":
            self.fail_node(p, f"agent reports failure: {seen.error or 'no reason given'}")
        elif (seen is not None and p.target is not None and converged(seen, p.target)
              and (s := seen.slots.get(p.slot)) is not None and s.status == "healthy"):
            # Converged says the traffic slots are healthy; a staged slot (weight 0) must be too.
            p.state = "done"
            self.emit("node.done", f"{p.node}: converged on generation {p.generation}", p.node,
                      generation=p.generation)

    def snapshot(self) -> dict[str, RouterStats]:
        return {n: o.router for n, o in self.obs.items()
                if n in self.r.nodes and o.router is not None}

    def start_bake(self, wave: WaveRecord) -> None:
        wave.state = "baking"
        if self.kind(wave) == "stage":
            # Staged slots carry no traffic, so there is nothing to bake: only --min-healthy
            # is judged, now; the baseline taken at the wave's start is kept for the switch.
            wave.bake_until = self.now
            return
        wave.bake_until = self.now + self.spec.bake
        wave.baseline = self.snapshot()
        if self.spec.bake:
            self.emit("wave.baking", f"wave {wave.index}: baking for "
                      f"{format_duration(self.spec.bake)}", wave=wave.index)

    def bake(self, wave: WaveRecord) -> None:
        r = self.r
        for n in wave.nodes:
            p = r.nodes[n]
            seen = self.obs.get(n)
            if not p.online:
                self.fail_node(p, "node went offline during the bake")
            elif seen is not None and seen.generation > p.generation:
                pass  # someone else wrote a newer desired state; judged by the gates' figures
            elif seen is not None and seen.observed_generation >= p.generation:
                slot = seen.slots.get(p.slot)
                status = slot.status if slot is not None else "empty"
                if seen.phase == "failed" or status != "healthy":
                    self.fail_node(p, f"new slot {p.slot} is {status} during the bake"
                                      + (f": {seen.error}" if seen.error else ""))
        failed = [r.nodes[n] for n in wave.nodes if r.nodes[n].state == "failed"]
        if failed:
            wave.state, wave.finished = "failed", self.now
            why = "; ".join(f"{p.node}: {p.reason}" for p in failed)
            self.on_failure(wave, f"wave {wave.index} failed: {why}")
            return
        if r.promote:
            wave.state, wave.finished = "passed", self.now
            wave.gates = {"outcome": "promoted"}
            self.emit("gate.skipped", f"wave {wave.index}: promoted by operator, gates skipped",
                      wave=wave.index)
            if r.promote == "step":
                r.promote = ""
            return
        if self.now < wave.bake_until:
            return
        if self.now < wave.bake_until + STATS_GRACE and not self.window_covers_bake(wave):
            return  # the agents' latest counters were read before the bake ended: wait for them
        verdict = self.verdict(wave)
        wave.gates = verdict.figures | {"outcome": verdict.outcome,
                                        "reasons": list(verdict.reasons)}
        if verdict.outcome == "pass":
            wave.state, wave.finished = "passed", self.now
            self.emit("gate.passed", f"wave {wave.index}: gates passed", wave=wave.index,
                      **verdict.figures)
        elif verdict.outcome == "fail":
            wave.state, wave.finished = "failed", self.now
            self.emit("gate.failed", f"wave {wave.index}: {verdict.reason}", wave=wave.index,
                      **verdict.figures)
            self.on_failure(wave, f"wave {wave.index} gates failed: {verdict.reason}")
        else:
            wave.state = "inconclusive"
            self.emit("gate.inconclusive", f"wave {wave.index}: {verdict.reason}",
                      wave=wave.index, **verdict.figures)
            self.pause(f"wave {wave.index} gates inconclusive: {verdict.reason}")

    def window_covers_bake(self, wave: WaveRecord) -> bool:
        """Whether every wave node's router counters span the whole bake since its baseline.

        Agents read their router's counters every few seconds, so the snapshots the bake starts
        and ends with are each up to that old, and a short bake could be judged on a window of
        almost nothing. Both snapshots carry the agent's read time (one clock per node, so no
        skew between hosts matters): the window is complete once they are ``bake`` apart.
        Unknown times (older agents), no baseline or a restarted router cannot be waited for.
        """
        for n in wave.nodes:
            seen = self.obs.get(n)
            end = seen.router if seen is not None else None
            start = wave.baseline.get(n)
            if end is None or start is None or not end.time or not start.time:
                continue
            if start.epoch == end.epoch and end.time - start.time < self.spec.bake:
                return False
        return True

    def verdict(self, wave: WaveRecord) -> gatelib.Verdict:
        kind = self.kind(wave)
        if kind == "shadow":
            return shadow.verdict(self, wave)
        gates = self.spec.gates
        if kind == "stage":
            gates = Gates(min_healthy=gates.min_healthy)
        elif self.spec.strategy == "shadow":
            # After a shadow, --then waves serve live traffic: nothing is mirrored any more.
            gates = msgspec.structs.replace(gates, max_mismatch_rate=None)
        new, old, mirror = [], [], []
        healthy = 0
        for n, p in self.r.nodes.items():
            seen = self.obs.get(n)
            end = seen.router if seen is not None else None
            start = wave.baseline.get(n)
            serving = serving_slot(p.previous)
            if serving is not None and serving != p.slot:
                old.append(gatelib.window(start, end, serving))
            if n not in wave.nodes:
                continue
            new.append(gatelib.window(start, end, p.slot))
            mirror.append(gatelib.mirror_window(start, end))
            slot = seen.slots.get(p.slot) if seen is not None else None
            healthy += slot is not None and slot.status == "healthy"
        if kind == "switch":
            old = [blue_green.old_window(self)]  # after the switch the old slots get no traffic
        reference = ""
        if kind == "":
            old, reference = self.old_reference(wave, old)
        fig = gatelib.figures(len(wave.nodes), healthy, new, old, mirror)
        verdict = gatelib.evaluate(gates, fig)
        if reference:
            verdict.figures["p99_old_from"] = reference
        return verdict

    def old_reference(
        self, wave: WaveRecord, old: list[gatelib.Window],
    ) -> tuple[list[gatelib.Window], str]:
        """The old release's traffic to compare this wave's new slots with, and where it is from.

        Normally the old slots' traffic in the same window. The last wave of a canary or rolling
        rollout leaves no old slot serving, so then it is the old traffic of the latest earlier
        window that had some (kept in ``report["old_window"]``), or failing that the old slots'
        counters up to this bake (since their routers started): no old traffic in the window must
        not make a healthy last step inconclusive.
        """
        total = sum(old, gatelib.Window())
        if total.requests:
            self.r.report["old_window"] = {"wave": wave.index, "requests": total.requests,
                                           "errors": total.errors, "latency": list(total.latency)}
            return old, ""
        kept = self.r.report.get("old_window")
        if kept:
            return [gatelib.Window(kept["requests"], kept["errors"], tuple(kept["latency"]))], \
                f"wave {kept['wave']}"
        before = []
        for n, p in self.r.nodes.items():
            serving = serving_slot(p.previous)
            if serving is not None and serving != p.slot:
                before.append(gatelib.window(None, wave.baseline.get(n), serving))
        return before, "old slots before this bake"

    def on_failure(self, wave: WaveRecord, reason: str) -> None:
        self.emit("wave.failed", reason, wave=wave.index)
        # A failed stage or shadow ends the rollout: nothing serves the new release yet, so
        # there is nothing to hold for an operator, and staged slots would only burn resources.
        if self.spec.on_failure == "pause" and self.kind(wave) not in ("stage", "shadow"):
            self.pause(reason)
        else:
            self.start_rollback(reason)

    def succeed(self) -> None:
        r = self.r
        if self.kind(r.waves[-1]) == "shadow":
            shadow.retire(self)  # a shadow without --then: report, and back to how it was
            self.finish("succeeded", "")
            return
        for p in r.nodes.values():
            if p.target is not None and len(p.target.slots) > 1:
                self.write(p, retire_target(p.target, slot=p.slot,
                                            generation=self.next_generation(p), now=self.now))
        self.finish("succeeded", "")

    def finish(self, state: str, reason: str) -> None:
        r = self.r
        self.move(state)
        r.reason, r.finished = reason, self.now
        moved = sorted(n for n, p in r.nodes.items()
                       if p.target is not None and p.state in ("done", "updating"))
        self.emit(f"rollout.{state}", f"{state.replace('_', ' ')}"
                  + (f": {reason}" if reason else f": {r.spec.service} {r.release.version} on "
                     f"{len(r.nodes)} nodes"), reason=reason, moved=moved)

    # -- rollback ----------------------------------------------------------------------------------

    def start_rollback(self, reason: str) -> None:
        r = self.r
        r.phase, r.reason = "rollback", reason
        r.rollback_deadline = self.now + self.spec.progress_deadline
        touched = sorted(n for n, p in r.nodes.items() if p.target is not None)
        for p in r.nodes.values():
            if p.target is None and p.state == "failed":
                p.state = "waiting"  # never written to, so still on its previous version
        self.emit("rollout.rolling_back", f"rolling back {len(touched)} nodes: {reason}",
                  reason=reason, nodes=touched)
        switching = any(self.kind(w) == "switch" for w in r.waves)
        for n in touched:
            p = r.nodes[n]
            p.state, p.reason = "rolling_back", ""
            back = blue_green.rollback_target(self, p) if switching else None
            self.write(p, back or self.restore(p))
        if "switch_back" in r.report:
            self.emit("bluegreen.switching_back", "switching every node back to the old slots",
                      at=self.now)
        self.advance_rollback()

    def restore(self, p: NodeProgress) -> DesiredState:
        return restore_target(
            p.previous, fleet=self.fleet, node=p.node, service=self.spec.service,
            generation=self.next_generation(p), rollout=self.r.id, now=self.now,
        )

    def advance_rollback(self) -> None:
        r = self.r
        pending = []
        for n, p in r.nodes.items():
            if p.state != "rolling_back" or p.target is None:
                continue
            seen = self.obs.get(n)
            previous = dict(p.previous.slots) if p.previous is not None else {}
            if seen is not None and converged(seen, p.target) and dict(p.target.slots) != previous:
                # Switched back with both slots kept: now retire the new one.
                self.write(p, self.restore(p))
                pending.append(p)
            elif seen is not None and converged(seen, p.target):
                p.state = "rolled_back"
                self.emit("node.rolled_back", f"{n}: back on generation {p.generation}", n)
            elif seen is not None and seen.generation >= p.generation and seen.phase == "failed":
                self.fail_node(p, f"rollback failed: {seen.error or 'no reason given'}")
            else:
                pending.append(p)
        if pending and self.now >= r.rollback_deadline:
            limit = format_duration(self.spec.progress_deadline)
            for p in pending:
                self.fail_node(p, f"did not converge back within {limit}"
                                  + ("" if p.online else " (offline)"))
            pending = []
        blue_green.switched_back(self)
        if pending:
            return
        failed = sorted(n for n, p in r.nodes.items() if p.state == "failed")
        if failed:
            self.finish("failed", f"rollback incomplete on {', '.join(failed)} ("
                        + "; ".join(r.nodes[n].reason for n in failed)
                        + f") after: {r.reason}")
        else:
            self.finish("rolled_back", r.reason)
