"""The per-service lock: one rollout at a time per service, taken over when stale.

Theory of operation: ``deploy`` creates ``fw-<fleet>-locks/<service>`` (value: the rollout id)
before it creates the record, and the runner deletes it once the rollout is terminal (only if it
still names that rollout, by compare-and-delete). A lock whose rollout is terminal or missing (a
coordinator that crashed in between) is stale and taken over; a lock held by a live rollout is a
Conflict that tells the operator what to do.
"""


import logging

from coordinator.runner_base import RunnerBase
from protocol.errors import Conflict
from protocol.messages import TERMINAL_STATES

log = logging.getLogger("fleetwave.coordinator.runner")


class Locks(RunnerBase):
    """The lock methods of ``coordinator.runner.Runner``."""

    async def _take_lock(self, service: str, rollout_id: str) -> None:
        for _ in range(2):
            try:
                await self._bounded(self.bus.kv_create(self._locks, service, rollout_id.encode()))
                return
            except Conflict:
                entry = await self._bounded(self.bus.kv_get(self._locks, service))
                if entry is None or entry.value is None:
                    continue  # released in between
                holder = entry.value.decode(errors="replace")
                record = await self.get(holder)
                if record is not None and record.state not in TERMINAL_STATES:
                    raise Conflict(
                        f"service {service} already has rollout {holder} {record.state}; wait "
                        f"for it ('fleetwave status {holder}') or stop it with 'fleetwave abort "
                        f"{holder}'") from None
                log.warning("taking over the stale lock of %s from %s rollout %s", service,
                            record.state if record else "missing", holder)
                try:
                    await self._bounded(self.bus.kv_delete(self._locks, service, entry.revision))
                except Conflict:
                    continue
        raise Conflict(f"the lock of service {service} keeps changing; try again")

    async def _release_lock(self, service: str, rollout_id: str) -> None:
        entry = await self._bounded(self.bus.kv_get(self._locks, service))
        if entry is None or entry.value != rollout_id.encode():
            return  # not ours (anymore)
        try:
            await self._bounded(self.bus.kv_delete(self._locks, service, entry.revision))
        except Conflict:
            return  # someone changed it in between: no longer ours to release
