"""Cordons and drains: operators holding nodes out of new rollouts, and out of service; and
``forget``, which drops a decommissioned (offline) node from the fleet.

Theory of operation: a cordon is an operator's decision, so the coordinator keeps it, in KV
``fw-<fleet>-cordons/<node>`` (a ``Cordon``: who, when, drained or not), never in the node's own
registration (``NodeInfo``), which the agent rewrites and which a node may write. Only the
leading coordinator writes the bucket (the API's writing verbs ``cordon`` and ``uncordon``); every
coordinator reads it for ``fleetwave nodes``, and a deploy reads it to hold cordoned nodes out
(``coordinator.core.planning.hold_out``).

A *drain* is a cordon that also reaches the node: every desired state of the node (one per
service) is written again at the next generation with ``drain`` set, signed like any other, so
an agent restarted while drained reads it again and stays drained (level-triggered); its routers
answer 503 on their readiness path at once and stop accepting after the grace. ``uncordon``
writes the states again without ``drain`` (the routers serve again), then removes the cordon.

Its writes are fenced like the rest of a leader's (``coordinator.runtime.lease``): a deposed
leader waking mid-``uncordon`` cannot delete the cordon its successor wrote (it gets Deposed and
stops leading).

Order, so that a failure half-way leaves the safe side: the cordon is stored before the drained
states are written (a rollout never starts on a node being drained), and removed only after the
undrained states are written (a node never looks returned while its routers are still out).

A running rollout: a cordon leaves it alone (its targets are kept, it finishes or rolls back as
planned; only new rollouts skip the node). A drain or undrain of a node that a live rollout
targets is refused (Conflict): both would write the same desired keys, and the rollout's writes
of a lower generation would be skipped. The runner calls these under the lock its deploys take,
so no rollout starts on a node between that check and the writes.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from msgspec import UNSET

from coordinator.runtime.calls import Retrying, bounded, readable_before
from coordinator.runtime.desired import DesiredWriter
from coordinator.runtime.lease import Fenced
from coordinator.runtime.ports import RunnerBus
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.events import EventPublisher
from protocol.messages import Cordon, DesiredState, DrainSpec, Event, SignedEnvelope

log = logging.getLogger("fleetwave.coordinator.cordons")


async def read_cordons(bus: RunnerBus) -> dict[str, Cordon]:
    """Every node's cordon, by node id.

    Only coordinators write the bucket, so an entry that does not decode is a stray write,
    not an operator's word, and it does not undo one: a principal of the bus can have the
    server write the answer to its request into any key (``Fenced._refence``), and a cordon
    so erased would let the next deploy update a node an operator took out. Such a key holds
    what its newest revision that decodes held (the bucket keeps 5): a cordon, or none when the
    key was deleted (uncordoned) before it; with none that decodes, cordoned by "unknown"."""
    bucket = subjects.cordons_bucket(bus.fleet)
    out: dict[str, Cordon] = {}
    for entry in await bounded(bus.kv_entries(bucket)):
        if entry.key == subjects.FENCE_KEY:
            continue  # the leader's fence (``coordinator.runtime.lease``), no node's cordon
        try:
            cordon: Cordon | None = decode(Cordon, entry.value or b"")
        except ProtocolError as exc:
            cordon = await _last_cordon(bus, bucket, entry, exc)
        if cordon is not None and cordon.node == entry.key:
            out[entry.key] = cordon
    return out


async def _last_cordon(bus: RunnerBus, bucket: str, entry: Entry,
                       exc: ProtocolError) -> Cordon | None:
    cordon, revision = await readable_before(bus, bucket, entry,
                                             lambda value: decode(Cordon, value))
    if revision == 0:
        return None  # uncordoned before the stray write
    if cordon is not None:
        log.warning("cordon entry %s holds what no coordinator writes (%s): its cordon is the "
                    "one before it (revision %d)", entry.key, exc, revision)
        return cordon
    # Every revision kept is unreadable (more stray writes than the bucket keeps, 5): failing
    # open would let the next deploy update a node an operator may have taken out. It stays
    # cordoned, by "unknown", until an operator's uncordon.
    log.warning("cordon entry %s is unreadable (%s), and so is every revision kept of it: "
                "the node counts as cordoned until 'fleetwave uncordon %s'", entry.key, exc,
                entry.key)
    return Cordon(node=entry.key, by="unknown")


class Cordons:
    """The writes of ``cordon`` and ``uncordon`` for one leadership; see the module docstring.

    ``targeted(node)`` names a live rollout that targets ``node`` (or None).
    """

    def __init__(self, bus: RunnerBus, *, fenced: Fenced, desired: DesiredWriter,
                 events: EventPublisher, retrying: Retrying, clock: Callable[[], float],
                 targeted: Callable[[str], str | None]) -> None:
        self.bus = bus
        self._fenced = fenced
        self.fleet = bus.fleet
        self.bucket = subjects.cordons_bucket(bus.fleet)
        self._desired = desired
        self._events = events
        self._retrying = retrying
        self._clock = clock
        self._targeted = targeted

    async def cordon(self, nodes: Iterable[str], *, drain: bool, grace: float,
                     who: str) -> list[dict[str, Any]]:
        """Cordon (and drain) ``nodes``; what became of each."""
        have = await read_cordons(self.bus)
        out = []
        for node in nodes:
            before = have.get(node)
            if drain and not (before is not None and before.drain):
                self._refuse_busy(node, "drain")
            if before is not None and (before.drain or not drain):
                out.append(_row(before, changed=False))
                continue
            now = self._clock()
            cordon = Cordon(node=node, by=who, time=now, drain=drain,
                            grace=grace if drain else 0.0)
            await self._retrying(functools.partial(self._put, cordon))
            if before is None:
                self._emit("node.cordoned", node, who, f"{node} cordoned by {who}: new rollouts "
                           "skip it")
            if drain:
                spec = DrainSpec(grace=grace, since=now, by=who)
                services = await self._rewrite(node, spec)
                self._emit("node.drained", node, who,
                           f"{node} drained by {who}: its routers answer 503 on their readiness "
                           f"path now and stop accepting after {grace:g}s", services=services,
                           grace=grace)
            out.append(_row(cordon, changed=True))
        return out

    async def uncordon(self, nodes: Iterable[str], *, who: str) -> list[dict[str, Any]]:
        """Return ``nodes`` to rollouts (and undrain them); what became of each."""
        have = await read_cordons(self.bus)
        out: list[dict[str, Any]] = []
        for node in nodes:
            before = have.get(node)
            if before is None:
                out.append({"node": node, "cordoned": False, "drained": False,
                            "changed": False})
                continue
            if before.drain:
                self._refuse_busy(node, "undrain")
                services = await self._rewrite(node, None)
                self._emit("node.undrained", node, who,
                           f"{node} undrained by {who}: its routers serve again",
                           services=services)
            await self._retrying(functools.partial(self._delete, node))
            self._emit("node.uncordoned", node, who,
                       f"{node} uncordoned by {who}: new rollouts include it again")
            out.append({"node": node, "cordoned": False, "drained": False, "changed": True})
        return out

    async def forget(self, nodes: Iterable[str], *, who: str) -> list[dict[str, Any]]:
        """Drop ``nodes`` (offline: the API checked) from the fleet: their registration, their
        observed states and their cordon; their desired states stay (a node whose agent comes
        back serves what it was told, and registers again). Conflict while a live rollout
        targets one."""
        out: list[dict[str, Any]] = []
        nodes = list(nodes)
        for node in nodes:  # every one before the first write: all or, refused, none
            self._refuse_busy(node, "forget")
        cordoned = await read_cordons(self.bus)
        for node in nodes:
            await self._retrying(functools.partial(self._forget, node, node in cordoned))
            self._emit("node.forgotten", node, who,
                       f"{node} forgotten by {who}: no longer in the fleet (its agent, if it "
                       "comes back, registers again)")
            out.append({"node": node, "forgotten": True})
        return out

    # -- helpers ----------------------------------------------------------------------------------

    def _refuse_busy(self, node: str, verb: str) -> None:
        rollout = self._targeted(node)
        if rollout is not None:
            raise Conflict(
                f"cannot {verb} {node}: rollout {rollout} targets it and writes its desired "
                f"states; wait for it to end (or 'fleetwave abort {rollout}'), then {verb} again")

    async def _rewrite(self, node: str, drain: DrainSpec | None) -> list[str]:
        """Write every desired state of ``node`` again at the next generation with ``drain``;
        the services written."""
        entries = await bounded(self.bus.kv_entries(
            subjects.desired_bucket(self.fleet), f"{node}.*"))
        written = []
        for entry in entries:
            try:
                current = decode(DesiredState, decode(SignedEnvelope, entry.value or b"").payload)
            except ProtocolError as exc:
                # Not "delete the key": a deleted key starts again at generation 1, which the
                # node refuses (its replay floor) for ever. A deploy plans from the last
                # readable revision and writes the generation after it.
                service = entry.key.partition(".")[2]
                raise BusError(f"desired state {entry.key} is unreadable ({exc}); deploy "
                               f"{service} again to that node to replace it, then drain "
                               "again") from None
            if (current.drained is None) == (drain is None):
                continue  # already so (an earlier attempt got this far)
            new = msgspec.structs.replace(current, generation=current.generation + 1,
                                          drain=UNSET if drain is None else drain,
                                          time=self._clock())
            await self._retrying(functools.partial(self._desired.write, new))
            written.append(current.service)
        return sorted(written)

    async def _put(self, cordon: Cordon) -> None:
        await self._write(cordon.node, encode(cordon))

    async def _delete(self, node: str) -> None:
        await self._write(node, None)

    async def _write(self, node: str, value: bytes | None) -> None:
        """Put (None: delete) ``node``'s cordon under this leadership's fence: once a later
        leader has fenced the bucket, a deposed one waking mid-``uncordon`` cannot delete the
        cordon its successor wrote (it gets Deposed and stops leading)."""
        # One key: no batch needed (``Bus.kv_fenced_all``: one message is checked and stored
        # whole, without the batch a single server stages in a store of its own).
        (result,) = await self._fenced.write_all(self.bucket, [(node, value)], atomic=False)
        if isinstance(result, BusError):
            raise result

    async def _forget(self, node: str, cordoned: bool) -> None:
        await bounded(self.bus.kv_purge_keys(subjects.observed_bucket(self.fleet), f"{node}.*"))
        if cordoned:  # a fenced delete (a purge cannot be fenced): it reads as uncordoned
            await self._delete(node)
        # Last: while its registration is there, a coordinator that starts knows the node.
        await bounded(self.bus.kv_purge_keys(subjects.nodes_bucket(self.fleet), node))

    def _emit(self, kind: str, node: str, who: str, message: str, **data: Any) -> None:
        log.info("%s", message)
        self._events.put(Event(id=uuid.uuid4().hex, time=self._clock(), fleet=self.fleet,
                               kind=kind, message=message, node=node, data=data, who=who))


def _row(cordon: Cordon, *, changed: bool) -> dict[str, Any]:
    return {"node": cordon.node, "cordoned": True, "drained": cordon.drain, "changed": changed,
            "by": cordon.by, "time": cordon.time, "grace": cordon.grace}
