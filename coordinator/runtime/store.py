"""The rollout store: rollout records and the per-service locks, as kept in the KV buckets.

Records (``fw-<fleet>-rollouts/<id>``) are written by compare-and-set on the revision last
written: ``persist`` given a stale revision meets a Conflict, and if the stored bytes are not
ours another coordinator drives the rollout (``Foreign``); if they are ours, only the reply was
lost and the write stands. A record is created once (``create``), and a lost reply is resolved the
same way, by reading it back.

The per-service lock: ``take_lock`` creates ``fw-<fleet>-locks/<service>`` (value: the rollout id)
before the record is created, and ``release_lock`` deletes it once the rollout is terminal (only
if it still names that rollout, by compare-and-delete). A lock whose rollout is terminal or
missing (a coordinator that crashed in between) is stale and taken over; a lock held by a live
rollout is a Conflict that tells the operator what to do.

Every call is bounded (``calls.bounded``); retrying is the caller's choice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from coordinator.runtime.calls import bounded
from coordinator.runtime.ports import RunnerBus
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.messages import TERMINAL_STATES, DesiredState, RolloutRecord, SignedEnvelope

log = logging.getLogger("fleetwave.coordinator.runner")

_ROLLOUT_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class Foreign(Conflict):
    """Another coordinator wrote our rollout record: we stop driving it."""


class RolloutStore:
    """The rollout records and service locks of one fleet in KV."""

    def __init__(self, bus: RunnerBus, *,
                 live: Callable[[str], RolloutRecord | None] = lambda _id: None) -> None:
        self.bus = bus
        self._live = live  # the record of a rollout driven here, which may be ahead of KV
        self.fleet = bus.fleet
        self.rollouts = subjects.rollouts_bucket(self.fleet)
        self.desired = subjects.desired_bucket(self.fleet)
        self.locks = subjects.locks_bucket(self.fleet)
        self._complained: set[str] = set()

    # -- records ----------------------------------------------------------------------------------

    async def load(self, rollout_id: str) -> RolloutRecord | None:
        """A rollout's record as persisted; None if there is none (or the id is not one)."""
        if not _ROLLOUT_ID.match(rollout_id):
            return None
        entry = await bounded(self.bus.kv_get(self.rollouts, rollout_id))
        if entry is None or entry.value is None:
            return None
        return self.decode(entry)

    async def entries(self) -> list[Entry]:
        """Every entry of the rollouts bucket (``decode`` reads them)."""
        return await bounded(self.bus.kv_entries(self.rollouts))

    def decode(self, entry: Entry) -> RolloutRecord | None:
        """The record in ``entry``, or None (logged once per key) if it does not decode."""
        try:
            return decode(RolloutRecord, entry.value or b"")
        except ProtocolError as exc:
            if entry.key not in self._complained:
                self._complained.add(entry.key)
                log.error("ignoring unreadable rollout record %s: %s", entry.key, exc)
            return None

    async def create(self, record: RolloutRecord) -> int:
        """Store a new record; its revision. On a failure the lock of its service is released,
        unless the record turns out to be there (a lost reply: the resync resumes it)."""
        data = encode(record)
        try:
            return await bounded(self.bus.kv_create(self.rollouts, record.id, data))
        except BusError:
            entry = await bounded(self.bus.kv_get(self.rollouts, record.id))
            if entry is None or entry.value != data:
                await self.release_lock(record.spec.service, record.id)
                raise
            return entry.revision

    async def persist(self, record: RolloutRecord, revision: int) -> int:
        """Compare-and-set ``record`` on ``revision``; the new revision, or Foreign."""
        data = encode(record)
        try:
            return await bounded(self.bus.kv_update(self.rollouts, record.id, data, revision))
        except Conflict:
            entry = await bounded(self.bus.kv_get(self.rollouts, record.id))
            if entry is not None and entry.value == data:  # ours: the reply was lost, not the write
                return entry.revision
            raise Foreign(f"rollout {record.id} was changed by another coordinator (revision "
                          f"{entry.revision if entry else 'deleted'}, ours {revision}); "
                          "this one stops driving it") from None

    async def current_desired(self, service: str) -> dict[str, DesiredState]:
        """Every node's current desired state of ``service``, from the desired bucket."""
        entries = await bounded(self.bus.kv_entries(self.desired, f"*.{service}"))
        out: dict[str, DesiredState] = {}
        for entry in entries:
            try:
                env = decode(SignedEnvelope, entry.value or b"")
                desired = decode(DesiredState, env.payload)
            except ProtocolError as exc:
                raise BusError(f"desired state {entry.key} is unreadable ({exc}); was it written "
                               "by another tool? delete the key to start that node afresh"
                               ) from None
            out[desired.node] = desired
        return out

    # -- locks ------------------------------------------------------------------------------------

    async def take_lock(self, service: str, rollout_id: str) -> None:
        """Lock ``service`` for ``rollout_id``, taking over a stale lock; Conflict if held."""
        for _ in range(2):
            try:
                await bounded(self.bus.kv_create(self.locks, service, rollout_id.encode()))
                return
            except Conflict:
                entry = await bounded(self.bus.kv_get(self.locks, service))
                if entry is None or entry.value is None:
                    continue  # released in between
                holder = entry.value.decode(errors="replace")
                record = self._live(holder) or await self.load(holder)
                if record is not None and record.state not in TERMINAL_STATES:
                    raise Conflict(
                        f"service {service} already has rollout {holder} {record.state}; wait "
                        f"for it ('fleetwave status {holder}') or stop it with 'fleetwave abort "
                        f"{holder}'") from None
                log.warning("taking over the stale lock of %s from %s rollout %s", service,
                            record.state if record else "missing", holder)
                try:
                    await bounded(self.bus.kv_delete(self.locks, service, entry.revision))
                except Conflict:
                    continue
        raise Conflict(f"the lock of service {service} keeps changing; try again")

    async def release_lock(self, service: str, rollout_id: str) -> None:
        """Delete the lock of ``service`` if it still names ``rollout_id``."""
        entry = await bounded(self.bus.kv_get(self.locks, service))
        if entry is None or entry.value != rollout_id.encode():
            return  # not ours (anymore)
        try:
            await bounded(self.bus.kv_delete(self.locks, service, entry.revision))
        except Conflict:
            return  # someone changed it in between: no longer ours to release
