"""Runner.resync: what a leader resumes when it takes over, whatever one record holds, and what
it writes beside a deploy (found by a review of the write path, session 30)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

import coordinator.runtime.desired as desired_mod
from coordinator.core import pages
from coordinator.errors import RemoteError
from protocol import subjects
from protocol.errors import BusError
from protocol.messages import DesiredState, ReleaseRef
from protocol.testing import NEW, OLD, FakeClock, spec
from tests.unit.coordinator.runtime.test_lease import until
from tests.unit.coordinator.runtime.test_runner import (
    DESIRED,
    ROLLOUTS,
    drive,
    fence,
    fleet_bus,
    killed_after_the_success,
    runner,
)
from tests.unit.coordinator.runtime.test_store_pages import N, make


async def two_open_rollouts() -> tuple[Any, FakeClock, Any, Any]:
    """A fleet of N nodes with two rollouts under way (hello and other), one leader's."""
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    a = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    other = ReleaseRef(service="other", version="2.0.0", digest="sha256:o")
    b = await r.deploy(spec(service="other", version="2.0.0", batch="3", max_unavailable="3"),
                       other)
    return bus, clock, a, b


async def test_one_unreadable_record_does_not_keep_the_others_from_being_resumed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two open rollouts; a page of the one read first is junk (any principal of the bus could
    have written it): the new leader resumes the other, and keeps trying the first. Before,
    the pass stopped at the first record, every time: neither was ever resumed."""
    monkeypatch.setattr(pages, "PAGE_BYTES", 3 * 2600)  # several pages for 12 nodes
    bus, clock, a, b = await two_open_rollouts()
    first, second = sorted([a.id, b.id])
    bus.set("put", ROLLOUTS, f"{first}.1", b"junk")
    fence(bus, 2)  # the leader died: a new one takes over
    successor = make(bus, clock)
    await successor.resync()
    assert sorted(successor.drivers) == [second]
    assert successor._resync_wanted.is_set()  # the unreadable one: another pass, soon


async def test_a_pass_that_drops_a_rollout_asks_for_the_next_at_once() -> None:
    """A rollout the pass could not resume (the bus failed its desired reads) is tried again
    within a second or so, not after RESYNC_INTERVAL (30 s): the loop cleared the pass's own
    request after the pass. (The passes that fail again back off 0.5, 1, 2 s: ~3.5 s here.)"""
    bus, clock = fleet_bus(), FakeClock()
    rec = await runner(bus, clock).deploy(spec(), NEW)
    successor = runner(bus, clock, command_deadline=0.05)
    bus.faults[("get", DESIRED)] = BusError("bus hiccup")
    bus.fault_count[("get", DESIRED)] = 3  # the first pass's reads only
    successor.synced.set()
    loop = asyncio.create_task(successor._resync_loop())
    try:  # within half RESYNC_INTERVAL
        await until(lambda: rec.id in successor.drivers, "the rollout resumed", timeout=15)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_a_finished_rollouts_last_writes_never_land_over_a_newer_deploy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader died after persisting a success, before its last desired writes; its
    successor's resync makes them while a deploy of the same service starts (it finds the lock
    stale). The resync's writes are signed and sent after their generations were checked: had
    the deploy's newer writes landed meanwhile, the older ones would replace them (generations
    going back on the nodes). Under the deploys' lock, the deploy waits for them."""
    monkeypatch.setattr(desired_mod, "SCAN_FROM", 0)  # as a fleet of > 256 nodes does
    # and signed in a worker thread, as a batch of more than SIGN_HERE states is (the hold
    # below blocks its thread; on the loop it would block the loop)
    monkeypatch.setattr(desired_mod, "SIGN_HERE", 0)
    bus, clock = fleet_bus(), FakeClock()
    await killed_after_the_success(bus, clock)
    clock.t += 5
    successor = runner(bus, clock)
    gate, signed = threading.Event(), []
    real = successor.desired._envelopes

    def slow(states: Sequence[DesiredState], term: int, batched: Sequence[bool]) -> list[bytes]:
        signed.append(len(states))
        if len(signed) == 1:  # the resync's batch, checked: held while it is signed
            gate.wait(5)
        return real(states, term, batched)

    successor.desired._envelopes = slow  # type: ignore[method-assign]
    resync = asyncio.create_task(successor.resync())
    await until(lambda: bool(signed), "the resync's batch being signed", timeout=5)
    deploy = asyncio.create_task(successor.deploy(
        spec(version=OLD.version, batch="100%", max_unavailable="100%"), OLD))
    await asyncio.wait({deploy}, timeout=1.0)  # done at once without the lock; with it, waits
    gate.set()
    await resync
    newer = await deploy
    wanted = {n: p.target.generation for n, p in bus.record(newer.id).nodes.items() if p.target}
    stored = {n: bus.desired(n).generation for n in wanted}
    assert stored == wanted, (stored, wanted)


async def test_a_create_whose_reply_was_lost_leaves_the_history_right() -> None:
    """The batch that creates a record (its head, its service's index, ``_latest``) landed and
    its reply was lost: the deploy goes on (the head is there), and the leader's history reads
    the indexes again: ``latest`` names the new rollout, not the one before it for the rest of
    the leadership."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    first = await r.deploy(spec(batch="100%", max_unavailable="100%"), NEW)
    await drive(r, bus, clock, first.id)
    real = bus.kv_fenced_all
    lost: list[bool] = []

    async def reply_lost(bucket: str, writes: Sequence[tuple[str, bytes | None]], fence: Any,
                         **kw: Any) -> list[Any]:
        out = await real(bucket, writes, fence, **kw)
        if bucket == ROLLOUTS and not lost and any(k == subjects.LATEST_KEY for k, _ in writes):
            lost.append(True)
            return [BusError("no reply")] * len(out)
        return list(out)

    bus.kv_fenced_all = reply_lost  # type: ignore[method-assign]
    clock.t += 10
    second = await r.deploy(spec(version=OLD.version), OLD)
    assert lost and await r.store.latest() == second.id


async def test_a_deploy_whose_leader_is_deposed_after_its_record_says_it_will_start() -> None:
    """A standby fences between the leader's create of a record and its take of the service's
    lock: the record is stored, and the next leader takes its lock and starts it. The operator
    is told so ("accepted", with its id), not "no rollout was started; try again", whose retry
    would be a second deploy (found by a review)."""
    bus, clock = fleet_bus(), FakeClock()
    old = runner(bus, clock)
    real = old.store.take_lock

    async def fenced_first(service: str, rid: str) -> None:
        fence(bus, 2)  # a standby took the lease and fenced (this leader was paused)
        await real(service, rid)

    old.store.take_lock = fenced_first  # type: ignore[method-assign]
    with pytest.raises(RemoteError) as info:
        await old.deploy(spec(), NEW, "alice")
    assert info.value.code == "accepted" and isinstance(info.value.data, dict), info.value
    rid = info.value.data["id"]
    successor = runner(bus, clock)  # the next leader, term 2
    await successor.resync()
    assert list(successor.drivers) == [rid]


async def test_a_rollout_whose_resume_crashes_keeps_the_others_and_the_leadership(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug while resuming one rollout (a review's node made the engine raise ValueError on a
    figure it reported) ended the runner, so the leader lost its lease every second and no
    rollout of the fleet moved. Now that rollout is dropped until the next pass (its traceback
    logged once), the other one resumed, and the resync loop goes on."""
    from coordinator.runtime import runner as runner_mod

    bus, clock, a, b = await two_open_rollouts()
    fence(bus, 2)
    successor = make(bus, clock)
    real = runner_mod.Runner._write_intended

    async def crashing(self: Any, rollout: Any) -> None:
        if rollout.record.id == a.id:
            raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
        await real(self, rollout)

    monkeypatch.setattr(runner_mod.Runner, "_write_intended", crashing)
    await successor.resync()
    await successor.resync()
    assert sorted(successor.drivers) == [b.id]
    assert successor._resync_wanted.is_set()
    assert caplog.text.count(f"rollout {a.id}: crashed resuming it") == 1
    # The loop survives a pass that raises outright, too.
    successor.synced.set()

    async def broken() -> None:
        raise ValueError("boom")

    successor.resync = broken  # type: ignore[method-assign]
    loop = asyncio.create_task(successor._resync_loop())
    try:
        await until(lambda: caplog.text.count("resuming the rollouts failed") >= 2,
                    "two failed passes", timeout=10)
        assert not loop.done()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
