"""The bound on a rollout's outbox (``Driver.bound_outbox``): what its record can store; what
the executor packs together (``executor._parts``)."""

from __future__ import annotations

import logging

import pytest

from coordinator.core.engine import Rollout
from coordinator.runtime.driver import NODE_OUTBOX_MAX, OUTBOX_MAX, Driver
from coordinator.runtime.executor import _parts
from protocol.events import pack
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


def test_a_pack_goes_only_when_all_its_nodes_are_past_their_room() -> None:
    """A pack counts once for each of its nodes. One node past its room does not take the
    other nodes' events with it (a stream away during a rollback: node-0 gathered five); a
    pack whose nodes are all past their room goes, and a dropped pack counts for no one."""
    driver = _driver(3)
    older = pack([_event(1, "node-0"), _event(2, "node-1"), _event(3, "node-2")])
    alone = pack([_event(10, "node-0"), _event(11, "node-0")])
    newer = [_event(20 + i, "node-0") for i in range(NODE_OUTBOX_MAX)]
    for event in [older, alone, *newer]:
        driver.outbox[event.id] = event
    driver.bound_outbox()
    assert older.id in driver.outbox and alone.id not in driver.outbox
    assert all(e.id in driver.outbox for e in newer)


def test_packs_keep_the_decisions_order_and_what_comes_before_its_first_write() -> None:
    """The packs of one decision (``executor._parts``): runs of node events whose nodes one page
    keeps, cut where the page changes, where another event comes, and where the decision's
    first write comes (what precedes it goes out at once, not after the writes)."""
    page_of = {"a": 0, "b": 0, "c": 1, "d": 1}
    kinds = {1: ("node.done", "a"), 2: ("node.done", "b"), 4: ("node.updating", "a"),
             5: ("node.updating", "b"), 6: ("node.updating", "c"), 7: ("node.updating", "d"),
             8: ("wave.started", ""), 9: ("node.updating", "a"), 10: ("node.updating", "c")}
    made = {i: Event(id=f"e{i}", time=1.0, fleet="f", kind=k, node=n, rollout="hello-1")
            for i, (k, n) in kinds.items()}
    assert _parts(sorted(made), made, page_of, first_write=3) == [[1, 2], [4, 5], [6, 7]]
