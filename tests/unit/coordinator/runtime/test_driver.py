"""The bound on a rollout's outbox (``Driver.bound_outbox``): what its record can store."""

from __future__ import annotations

import logging

import pytest

from coordinator.core.engine import Rollout
from coordinator.runtime.driver import NODE_OUTBOX_MAX, OUTBOX_MAX, Driver
from protocol.messages import Event, NodeProgress, RolloutRecord, WaveRecord
from protocol.testing import NEW, spec


def _driver(nodes: int) -> Driver:
    names = [f"node-{i}" for i in range(nodes)]
    rec = RolloutRecord(id="hello-1", spec=spec(), release=NEW, state="running",
                        nodes={n: NodeProgress(node=n) for n in names},
                        waves=[WaveRecord(index=0, nodes=names)])
    return Driver(rollout=Rollout(rec, fleet="f"), revision=1)


def _event(i: int, node: str = "") -> Event:
    return Event(id=f"e{i}", time=float(i), fleet="f", kind="node.updating", message="m",
                 node=node, rollout="hello-1")


def test_a_wave_of_thousands_keeps_every_event_of_its_nodes() -> None:
    """Two events each for 3,000 nodes (one wave's staging and update) all stay: the bound is
    per node, not per rollout."""
    driver = _driver(3000)
    for i in range(6000):
        event = _event(i, f"node-{i % 3000}")
        driver.outbox[event.id] = event
    driver.bound_outbox()
    assert len(driver.outbox) == 6000


def test_past_its_bound_the_oldest_go_logged(caplog: pytest.LogCaptureFixture) -> None:
    driver = _driver(2)
    events = [_event(i, "node-0") for i in range(NODE_OUTBOX_MAX + 3)]
    events += [_event(100 + i) for i in range(OUTBOX_MAX + 2)]
    events += [_event(5000, "node-1")]
    for event in events:
        driver.outbox[event.id] = event
    with caplog.at_level(logging.ERROR):
        driver.bound_outbox()
    kept = list(driver.outbox)
    assert kept[:NODE_OUTBOX_MAX] == [f"e{i}" for i in range(3, NODE_OUTBOX_MAX + 3)]
    assert sum(1 for e in driver.outbox.values() if not e.node) == OUTBOX_MAX
    assert "e100" not in driver.outbox and "e101" not in driver.outbox and "e5000" in kept
    assert sum("outbox full" in r.message for r in caplog.records) == 5
