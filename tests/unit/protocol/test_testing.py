"""The testing kit's fakes behave like what they stand in for, where tests rely on it."""

from __future__ import annotations

import pytest

from protocol.errors import BusError, Conflict
from protocol.testing import PUBLISH, FakeBus, FakeClock, desired, report


async def test_fake_kv_compare_and_set_follows_revisions(fake_bus: FakeBus) -> None:
    """create refuses an existing key, update and delete refuse a stale revision."""
    rev = await fake_bus.kv_create("b", "k", b"1")
    with pytest.raises(Conflict):
        await fake_bus.kv_create("b", "k", b"2")
    with pytest.raises(Conflict):
        await fake_bus.kv_update("b", "k", b"2", rev - 1)
    rev2 = await fake_bus.kv_update("b", "k", b"2", rev)
    with pytest.raises(Conflict):
        await fake_bus.kv_delete("b", "k", rev)
    await fake_bus.kv_delete("b", "k", rev2)
    assert await fake_bus.kv_get("b", "k") is None


async def test_fake_faults_fire_as_often_as_armed(fake_bus: FakeBus) -> None:
    """A fault armed twice fails two calls, then the operation works again."""
    fake_bus.faults[("get", "b")] = BusError("down")
    fake_bus.fault_count[("get", "b")] = 2
    for _ in range(2):
        with pytest.raises(BusError):
            await fake_bus.kv_get("b", "k")
    assert await fake_bus.kv_get("b", "k") is None
    fake_bus.faults[(PUBLISH, PUBLISH)] = BusError("away")
    assert await fake_bus.js_publish_events([("s", b"x")]) == [fake_bus.faults[(PUBLISH, PUBLISH)]]
    assert await fake_bus.js_publish_events([("s", b"x")]) == [None]


def test_fake_clock_moves_only_when_told(fake_clock: FakeClock) -> None:
    """The clock reads what the test set."""
    assert fake_clock() == 1000.0
    fake_clock.t += 5
    assert fake_clock() == 1005.0


def test_report_says_converged_on_the_desired_state() -> None:
    """A report carries the desired generation, healthy slots and only the positive weights."""
    d = desired("node-1")
    seen = report(d, 3.0)
    assert (seen.generation, seen.observed_generation, seen.phase) == (7, 7, "converged")
    assert seen.weights == {"a": 100} and seen.slots["a"].status == "healthy"
