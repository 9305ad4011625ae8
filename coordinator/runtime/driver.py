"""One live rollout as the runner drives it, and the progress it may hold back.

A ``Driver`` is the engine's ``Rollout``, the KV revision of its record, and the lock that
serialises its events. It also holds back a step that records node progress only (nodes done,
rolled back or staged ahead of their wave, health and versions seen) for up to ``HOLD_PERSIST``
(``coalesce``), so that the reports of a big wave, arriving in many batches, cost a few record
writes instead of one each (the record is megabytes at thousands of nodes), and the slots staged
for later waves do not each cost a record write (an atomic batch on the broker) while the first
wave's are starting. What is held is persisted, then its events published,
ahead of the next step's commands, or by the next step that changes nothing (every tick is one).
Nothing is lost by holding: a coordinator that dies meanwhile never published those events, and
its successor derives the same progress again from the observed states.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import msgspec

from coordinator.core.engine import Command, EmitEvent, Persist, Rollout
from protocol.events import members
from protocol.messages import Event, RolloutRecord

log = logging.getLogger("fleetwave.coordinator.runner")

# What one rollout's outbox holds at most (``Driver.bound_outbox``): its own events, kept in the
# record's head, and the events about each node, kept on the node's page. A page of nodes
# (<= 256 KiB of them, ~1 KB or more each) then stays under 1 MB with its events (< 512 B each).
OUTBOX_MAX = 1000
NODE_OUTBOX_MAX = 4
EVENT_BYTES = 512  # what a record keeps free per event of its outbox (``Runner._layout``)

# How long a record change of node progress only may wait for the next Persist.
HOLD_PERSIST = 0.25
PROGRESS_EVENTS = frozenset({"node.done", "node.rolled_back", "node.staged"})


@dataclass(eq=False)
class Driver:
    """One live rollout: the engine, the revision of its record in KV, and its event lock."""

    rollout: Rollout
    revision: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # A record change of node progress only, and its events, held back since ``held_since``.
    held: list[Command] = field(default_factory=list)
    held_since: float = 0.0
    # The outbox (``coordinator.runtime.executor``): events persisted with the record and not yet
    # acknowledged by the stream, in order; whether the record in KV holds a non-empty outbox,
    # and when it was last written.
    outbox: dict[str, Event] = field(default_factory=dict)
    outbox_stored: bool = False
    persisted_at: float = 0.0
    outbox_retried: float = 0.0  # when its old events were last sent again
    # The node table's count of changes (``Fleet.changes``) at which every target node's
    # ``online`` last agreed with it (``Runner.step``), None: look again
    agreed: int | None = None

    @property
    def id(self) -> str:
        return self.rollout.record.id

    @property
    def undo(self) -> bool:
        """Started by ``rollback SERVICE`` (``RolloutRecord.undo``)."""
        return self.rollout.record.undo

    def bound_outbox(self) -> None:
        """Keep the outbox within what its record can store, dropping the oldest (logged):
        ``OUTBOX_MAX`` events of the rollout's own (kept in the record's head) and
        ``NODE_OUTBOX_MAX`` about each of its nodes (kept on the node's page, ``core.pages``).
        Only a stream away for long fills either: an acknowledged event leaves at once."""
        own = 0
        per_node: dict[str, int] = {}
        nodes = self.rollout.record.nodes
        drop: list[str] = []
        for eid, event in reversed(self.outbox.items()):  # newest first: the oldest go
            if event.node and event.node in nodes:
                # A pack counts once for each of its nodes; it goes only when all of them are
                # past their room (its other nodes' events would go with it), or when one is
                # past twice that (a member takes half an event's room, ~230 of 512 bytes).
                about = [n for m in members(event)
                         if isinstance(n := m.get("node"), str)] or [event.node]
                counts = [per_node.get(n, 0) + 1 for n in about]
                if (all(c > NODE_OUTBOX_MAX for c in counts)
                        or any(c > 2 * NODE_OUTBOX_MAX for c in counts)):
                    drop.append(eid)
                    continue
                per_node.update(zip(about, counts, strict=True))
            else:
                own += 1
                if own > OUTBOX_MAX:
                    drop.append(eid)
        for eid in drop:
            lost = self.outbox.pop(eid)
            log.error("rollout %s: outbox full; event %s%s dropped unrecorded", self.id,
                      lost.kind, f" of {lost.node}" if lost.node else "")

    @property
    def service(self) -> str:
        return self.rollout.record.spec.service

    def coalesce(self, before: RolloutRecord, commands: list[Command],
                 now: float) -> list[Command]:
        """The commands to carry out now: ``commands`` with what was held ahead of them, or
        nothing if this step is progress only and may wait (see the module docstring)."""
        fresh = not self.held or now - self.held_since < HOLD_PERSIST
        if (fresh and commands and isinstance(commands[0], Persist)
                and _progress_only(before, commands)):
            if not self.held:
                self.held_since = now
            self.held = [commands[0], *self.held[1:], *commands[1:]]
            return []
        if not self.held:
            return commands
        held, self.held = self.held, []
        if commands and isinstance(commands[0], Persist):  # the newer record includes the held
            return [commands[0], *held[1:], *commands[1:]]
        return [*held, *commands]


def _progress_only(before: RolloutRecord, commands: list[Command]) -> bool:
    """Whether a step's commands (Persist first) record node progress and nothing else: no
    desired write, only routine node events, and the rollout's own fields and waves as they
    were (so neither a decision nor a deadline waits behind a held Persist)."""
    after = commands[0].record if isinstance(commands[0], Persist) else before
    if any(not isinstance(c, EmitEvent) or c.kind not in PROGRESS_EVENTS for c in commands[1:]):
        return False
    same_nodes = msgspec.structs.replace(after, nodes=before.nodes, revision=before.revision,
                                         updated=before.updated)
    return same_nodes == before
