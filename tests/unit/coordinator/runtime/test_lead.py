"""Coordinator._lead_loop: a new leader holds its lease from the take on, while it fences the
buckets and re-signs the desired states (found by a review of the lease, session 30)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from coordinator.runtime import daemon
from coordinator.runtime.daemon import Coordinator
from coordinator.runtime.lease import Lease, write_fences
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode, encode
from protocol.messages import SignedEnvelope
from protocol.signing import generate_seed, public_key, sign
from protocol.testing import FLEET, FakeBus, desired

SCALE = 10.0  # lease seconds a real second: a 2 s ttl is 0.2 s here


class Bus(FakeBus):
    """What the leading loop needs of the bus beyond the fake's buckets."""

    reconnects = 0

    async def publish(self, subject: str, data: bytes) -> None:
        pass

    def fleet_streams(self) -> list[str]:
        return []

    async def watch(self, bucket: str, pattern: str, **kw: Any) -> AsyncIterator[Entry | None]:
        async for e in super().watch(bucket, pattern, **kw):
            yield e
        await asyncio.Event().wait()  # a watch lasts as long as its leadership


async def test_leaders_that_re_sign_longer_than_the_ttl_do_not_depose_each_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three coordinators after a signing-key rotation (each with the previous key), re-signing
    the fleet's desired states taking 2.5 s, longer than the 2 s lease ttl (~21,500 states at
    ~93 µs each; 4.6 s at 50,000): the first to take the lease renews it meanwhile, leads, and
    the desired states carry its term. Before, the lease was renewed only once the leader led:
    a standby took it over at the ttl, deposing the re-signing leader, and so on for ever (the
    review: 15 takeovers in 30 lease-seconds, no leader)."""
    old = generate_seed()
    bus = Bus()
    start = time.monotonic()

    def mono() -> float:
        return 1000 + SCALE * (time.monotonic() - start)

    await write_fences(bus, term=1, holder="before", now=0.0, key=public_key(old))
    bucket = subjects.desired_bucket(FLEET)
    for i in range(3):
        state = msgspec.structs.replace(desired(f"n{i}"), fleet=FLEET, node=f"n{i}")
        bus.set("put", bucket, f"n{i}.{state.service}", encode(sign(old, state, term=1)))
    real = daemon.resign_desired

    async def slow(*a: Any, **kw: Any) -> Any:
        await asyncio.sleep(2.5 / SCALE)  # its signing, while the others go on
        return await real(*a, **kw)

    monkeypatch.setattr(daemon, "resign_desired", slow)
    monkeypatch.setattr(daemon, "RETRY_LEAD", 1.0 / SCALE)
    new = generate_seed()
    coordinators = []
    for _ in range(3):
        c = Coordinator("nats://127.0.0.1:4222", FLEET, seed=new, previous_key=public_key(old))
        c.bus = bus  # type: ignore[assignment]
        c.lease = Lease(bus, me=c.id, key=c.public_key, ttl=2.0, renew=0.4 / SCALE,  # type: ignore[arg-type]
                        poll=0.1 / SCALE, monotonic=mono)
        coordinators.append(c)
    loops = [asyncio.ensure_future(c._lead_loop(bus)) for c in coordinators]  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(3.0):  # 30 lease-seconds
            while not any(c.runner is not None for c in coordinators):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        leader = next(c for c in coordinators if c.runner is not None)
        await asyncio.sleep(1.0)  # 10 lease-seconds more: it keeps the lead
        assert leader.runner is not None
        assert sum(c.lease.takeovers for c in coordinators if c.lease is not None) == 1
    finally:
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    assert leader.lease is not None and leader.lease.current is not None
    terms = {decode(SignedEnvelope, e.value).term for e in bus.kv[bucket].values()
             if e.value and e.key != subjects.FENCE_KEY}
    assert terms == {leader.lease.current.term}, terms
