"""A signing-key rotation's bus side: a new leader's re-signing, and reading where it stands.

``resign_desired`` signs again the desired states the previous signing key signed. It is run by
the daemon after fencing and before the runner starts, so nothing else writes the desired
bucket meanwhile; level-triggered: every leadership of a coordinator that has a previous key
looks again, so a pass cut short (a crash, a lost fence) is finished by the next one. What to
re-sign is decided in ``coordinator.core.rotation.plan_resign``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from coordinator.core.rotation import ResignPlan, Stage, Status, plan_resign, status
from coordinator.runtime.calls import bounded
from coordinator.runtime.lease import Fenced
from coordinator.runtime.ports import RunnerBus
from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.messages import LeaseRecord, NodeInfo
from protocol.signing import public_key, resign

log = logging.getLogger("fleetwave.coordinator")


async def resign_desired(bus: RunnerBus, fenced: Fenced, *, seed: bytes,
                         previous: Collection[str]) -> ResignPlan:
    """Sign every desired state signed by a ``previous`` key again with ``seed`` (same
    generation and payload, this leadership's term); BusError (Deposed too) if a write fails."""
    bucket = subjects.desired_bucket(bus.fleet)
    entries = await bounded(bus.kv_entries(bucket))
    # Verified and signed in a worker thread (~93 µs a state: 4.6 s at 50,000), so that the
    # loop renews the lease meanwhile (``Lease.hold`` runs from the take on).
    plan = await asyncio.to_thread(
        plan_resign, {e.key: e.value for e in entries if e.value is not None}, fleet=bus.fleet,
        own=public_key(seed), previous=previous)
    for key, why in plan.skipped.items():
        log.warning("not re-signing desired state %s: %s", key, why)
    if not plan.resign:
        return plan

    def signed() -> list[tuple[str, bytes | None]]:
        return [(key, encode(resign(seed, env, term=fenced.term)))
                for key, env in plan.resign.items()]

    writes = await asyncio.to_thread(signed)
    for result in await fenced.write_all(bucket, writes):
        if isinstance(result, BusError):
            raise result
    log.info("re-signed %d desired state(s) with the new signing key %s (same generations: "
             "no node moves)", len(writes), public_key(seed))
    return plan


async def read_status(bus: RunnerBus, *, stage: Stage, old: str, new: str) -> Status:
    """Where a rotation from ``old`` to ``new`` stands, read from the fleet's buckets (no
    coordinator needed: a switch may leave none running for a moment)."""
    f = bus.fleet
    nodes = []
    for e in await bounded(bus.kv_entries(subjects.nodes_bucket(f))):
        try:
            info = decode(NodeInfo, e.value or b"")
        except ProtocolError:
            continue
        if info.id == e.key:  # only node K may write key K: any other claim is not believed
            nodes.append(info)
    desired = {e.key: e.value for e in await bounded(bus.kv_entries(subjects.desired_bucket(f)))
               if e.value is not None}
    leader_key = ""
    lease = await bounded(bus.kv_get(subjects.lease_bucket(f), subjects.LEASE_KEY))
    if lease is not None and lease.value:
        try:
            held = decode(LeaseRecord, lease.value)
            leader_key = held.key if held.holder else ""
        except ProtocolError:
            pass
    return status(stage=stage, old=old, new=new, leader_key=leader_key, nodes=nodes,
                  desired=desired)
