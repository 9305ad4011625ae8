"""``Rollout.handle_all``: many feed events in one engine step (the runner's batches)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.engine import (
    IllegalTransition,
    NodeOffline,
    ObservedChanged,
    Pause,
    Persist,
    Rollout,
    Start,
    Tick,
    new_record,
)
from coordinator.core.engine_progress import reported
from protocol.messages import NodeView, ObservedState, RouterStats, SlotStatus, SlotTraffic
from protocol.testing import NEW, OLD, desired, spec
from tests.unit.coordinator.core.test_engine import observed
from tests.unit.coordinator.kit import kinds, rollout, writes


def started(n: int, **kw: object) -> tuple[Rollout, list[ObservedChanged]]:
    """A started rollout of ``n`` nodes in one wave, and every node's converged report."""
    r = rollout(n, batch=str(n), max_unavailable=str(n), **kw)
    cmds = r.handle(Start(), 1.0)
    return r, [ObservedChanged(d.node, observed(d, 2.0)) for d in writes(cmds)]


def test_a_batch_decides_what_one_by_one_decides_by_the_last() -> None:
    """A wave's reports fed as one batch end in the same record as fed one at a time."""
    one, reports = started(5)
    for ev in reports:
        one.handle(ev, 3.0)
    many, reports2 = started(5)
    many.handle_all(reports2, 3.0)
    assert many.state == one.state == "succeeded"
    assert {n: p.state for n, p in many.record.nodes.items()} == {
        n: p.state for n, p in one.record.nodes.items()}


def test_a_batch_persists_once_before_its_writes() -> None:
    """One Persist for the whole batch, first, then the retirement writes it decided."""
    r, reports = started(4)
    cmds = r.handle_all(reports, 3.0)
    assert sum(isinstance(c, Persist) for c in cmds) == 1 and isinstance(cmds[0], Persist)
    assert kinds(cmds).count("node.done") == 4 and kinds(cmds)[-1] == "rollout.succeeded"


def test_a_batch_with_an_operator_request_raises_and_changes_nothing() -> None:
    """Only feed events batch; a Pause among them is refused and the rollout is unchanged."""
    r, reports = started(3)
    before = r.record
    with pytest.raises(IllegalTransition, match="in a batch"):
        r.handle_all([*reports, Pause("x")], 3.0)
    assert r.record is before and r.state == "running"


def test_a_batch_mixes_offline_nodes_and_ticks() -> None:
    """An offline node in the same batch as the others' reports fails the wave (rollback)."""
    r, reports = started(3)
    cmds = r.handle_all([*reports[:2], NodeOffline(reports[2].node), Tick()], 3.0)
    assert "rollout.rolling_back" in kinds(cmds)


def test_an_empty_batch_does_nothing() -> None:
    """No events, no commands."""
    r, _ = started(2)
    assert r.handle_all([], 3.0) == []


def test_only_the_last_two_waves_keep_their_router_baseline() -> None:
    """Baselines of finished waves are dropped when a wave starts (only the bake's and the one
    before it are read again), so the record does not grow with waves x nodes."""
    r = rollout(4, batch="1", max_unavailable="1", bake=0.0)
    stats = RouterStats(epoch=1.0, slots={"a": SlotTraffic(requests=5)})
    cmds = r.handle(Start(), 1.0)
    t = 2.0
    while not r.done:
        written = writes(cmds)
        cmds = r.handle_all([ObservedChanged(d.node, observed(d, t, router=stats))
                             for d in written], t) if written else r.handle(Tick(), t)
        t += 1.0
        current = r.record.current_wave
        assert all(not w.baseline for w in r.record.waves[:max(0, current - 1)])
    assert r.state == "succeeded" and r.record.waves[-1].baseline


def test_a_record_made_with_the_reports_starts_where_feeding_them_leaves_it() -> None:
    """``new_record(observed=...)`` sets each node's health and version as the reports fed
    afterwards would: fed then, they change nothing (no node copied, nothing to persist).
    A report that claims another node or another service is not taken."""
    nodes = [NodeView(id=f"node-{i}") for i in range(1, 5)]
    current = {v.id: desired(v.id) for v in nodes}
    reports = {n: observed(d, 0.5) for n, d in current.items()}
    reports["node-2"] = msgspec.structs.replace(reports["node-2"], weights={})  # no traffic
    reports["node-3"] = msgspec.structs.replace(reports["node-3"], service="other")
    reports["node-4"] = msgspec.structs.replace(reports["node-4"], node="node-1")
    fed = [ObservedChanged(n, s) for n, s in reports.items()]

    def made(**kw: object) -> Rollout:
        return Rollout(new_record(id="r", spec=spec(batch="2"), release=NEW, nodes=nodes,
                                  current=current, now=0.0, **kw), fleet="f")  # type: ignore[arg-type]

    seeded, plain = made(observed=reports), made()
    plain.handle_all(fed, 1.0)
    assert seeded.record.nodes == plain.record.nodes
    # What the rollout comes from is what the nodes were told, not what they say they run.
    liar = made(observed={n: msgspec.structs.replace(s, slots={
        k: msgspec.structs.replace(v, version="0.9.0") for k, v in s.slots.items()})
        for n, s in ((n, observed(d, 0.5)) for n, d in current.items())})
    assert [p.version for p in liar.record.nodes.values()] == ["0.9.0"] * 4
    assert liar.record.from_version == plain.record.from_version == OLD.version
    assert [seeded.record.nodes[n].healthy for n in current] == [True, False, False, False]
    assert seeded.record.nodes["node-1"].version == OLD.version
    before = seeded.record
    assert not any(isinstance(c, Persist) for c in seeded.handle_all(fed, 1.0))
    assert all(seeded.record.nodes[n] is before.nodes[n] for n in current)


@given(st.dictionaries(st.sampled_from("abc"), st.integers(-1, 100), max_size=3),
       st.dictionaries(st.sampled_from("abc"), st.sampled_from(["healthy", "unhealthy"]),
                       max_size=3))
def test_what_a_report_says_is_healthy_traffic_and_the_heaviest_slots_version(
        weights: dict[str, int], statuses: dict[str, str]) -> None:
    """``reported``: healthy when a slot with traffic is, and the version of the slot with the
    largest weight (the first of equals), else the version known before."""
    slots = {s: SlotStatus(slot=s, status=st_, version=f"v-{s}") for s, st_ in statuses.items()}
    seen = ObservedState(node="n", service="hello", slots=slots, weights=weights)
    healthy = any(w > 0 and s in slots and slots[s].status == "healthy" for s, w in weights.items())
    serving = max(weights, key=lambda s: weights[s], default=None)
    assert reported(seen, "known") == (
        healthy, slots[serving].version if serving in slots else "known")
