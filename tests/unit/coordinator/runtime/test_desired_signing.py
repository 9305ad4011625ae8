"""coordinator.runtime.desired: a small batch of desired states is signed on the loop, a large
one in worker threads (the hand-off costs milliseconds under load; signing thousands does not
belong on the loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from coordinator.runtime import desired as desired_mod
from coordinator.runtime.calls import Retrying
from coordinator.runtime.desired import SIGN_HERE, DesiredWriter
from protocol.signing import generate_seed
from protocol.testing import FakeBus, desired
from tests.unit.coordinator.runtime.test_runner import fence, fenced


@pytest.mark.parametrize(("nodes", "threads"), [(2, 0), (SIGN_HERE, 0), (SIGN_HERE + 1, 1)])
async def test_a_small_batch_is_signed_on_the_loop(
    monkeypatch: pytest.MonkeyPatch, nodes: int, threads: int,
) -> None:
    handed: list[str] = []
    real = asyncio.to_thread

    async def to_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        handed.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(desired_mod.asyncio, "to_thread", to_thread)
    bus = FakeBus()
    fence(bus, 1)
    writer = DesiredWriter(bus, seed=generate_seed(), fenced=fenced(bus), retrying=Retrying())
    first = [desired(f"node-{i}", generation=1) for i in range(nodes)]
    await writer.write_all(first)  # unknown keys: read, then written one by one
    handed.clear()
    await writer.write_all([desired(f"node-{i}", generation=2) for i in range(nodes)])
    assert handed.count("_envelopes") == threads
    assert all(bus.desired(f"node-{i}").generation == 2 for i in range(nodes))  # type: ignore[union-attr]
