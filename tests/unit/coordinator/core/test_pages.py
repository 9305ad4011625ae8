"""The record split (``coordinator.core.pages``): how a record is cut into a head and pages, put
back together, which pages a step changes, and which rollouts cannot be stored at all."""

from __future__ import annotations

import random

import msgspec
import pytest
from msgspec import UNSET

from coordinator.core import pages
from coordinator.core.engine import Rollout, Start, new_record, worst_case_sizes
from coordinator.errors import UsageError
from coordinator.runtime.driver import EVENT_BYTES, NODE_OUTBOX_MAX
from protocol.codec import encode
from protocol.history import RolloutPage
from protocol.messages import Event, NodeProgress, NodeView, RolloutRecord, WaveRecord
from protocol.testing import NEW, desired, report, router_stats, spec


def record(n: int, waves: int = 4, *, canary: bool = False) -> RolloutRecord:
    """``n`` nodes in ``waves`` waves (under ``canary`` each wave holds the ones before it too,
    as canary steps do), the last node in no wave, baselines and evidence on some waves."""
    nodes = [f"node-{i}" for i in range(n)]
    per = max(1, (n - 1) // waves)
    members = [nodes[i * per:(i + 1) * per] for i in range(waves)]
    if canary:
        members = [nodes[:(i + 1) * per] for i in range(waves)]
    stats = router_stats()
    rec = RolloutRecord(
        id="hello-1", spec=spec(), release=NEW, state="running",
        nodes={x: NodeProgress(node=x, previous=desired(x), wave=i // per) for i, x in
               enumerate(nodes)},
        waves=[WaveRecord(index=i, nodes=list(m)) for i, m in enumerate(members)])
    rec.waves[0].baseline = {x: stats for x in members[0]}
    rec.waves[1].evidence_from = {x: stats for x in members[1][: per // 2]}
    return rec


def stored(rec: RolloutRecord, layout: pages.Layout) -> dict[int, RolloutPage]:
    return {p.index: p for p in pages.split(rec, layout)[1]}


def small(budget: int) -> pages.Layout:
    return pages.plan(pages.order(record(100)), lambda _n: 1000, budget)


@pytest.mark.parametrize("canary", [False, True])
def test_a_split_record_assembles_to_itself(canary: bool) -> None:
    rec = record(100, canary=canary)
    layout = pages.plan(pages.order(rec), lambda n: len(encode(rec.nodes[n])), 4000)
    top, parts = pages.split(rec, layout)
    assert len(parts) > 5 and top.pages == len(parts) and top.node_count == 100
    assert top.nodes == {} and all(w.nodes == [] and w.baseline == {} for w in top.waves)
    assert top.waves[1].evidence_from == {} and top.waves[2].evidence_from is UNSET
    again = pages.assemble(top, reversed(parts))  # any order
    assert again == rec
    assert list(again.nodes) == list(rec.nodes)  # the table's order too
    assert pages.layout_of(top, parts).pages == layout.pages


def test_pages_follow_the_waves_and_respect_the_budget() -> None:
    rec = record(100)
    layout = pages.plan(pages.order(rec), lambda _n: 1000, 10_000)
    assert all(len(p) == 10 for p in layout.pages)
    assert layout.pages[0] == rec.waves[0].nodes[:10]
    # a wave's nodes are on as few pages as its size needs, not spread over the fleet
    assert len({layout.page_of[n] for n in rec.waves[2].nodes}) <= 4


def test_a_record_kept_in_one_value_needs_no_pages() -> None:
    rec = record(10)
    assert rec.pages == 0 and pages.assemble(pages.head(rec, pages.Layout([])), []) != rec
    assert msgspec.structs.replace(rec, pages=0) == rec  # the old format is the record itself


def test_a_missing_page_is_named() -> None:
    rec = record(100)
    top, parts = pages.split(rec, small(10_000))
    with pytest.raises(ValueError, match=r"1 of its 10 pages are missing \(first: hello-1.3\)"):
        pages.layout_of(top, [p for p in parts if p.index != 3])


def test_a_node_changed_dirties_its_page_only() -> None:
    rec = record(100)
    layout = small(10_000)
    after = msgspec.structs.replace(rec, nodes=dict(rec.nodes))
    assert pages.dirty(rec, after, layout) == set()
    after.nodes["node-42"] = msgspec.structs.replace(rec.nodes["node-42"], state="updating")
    assert pages.dirty(rec, after, layout) == {layout.page_of["node-42"]}


def test_a_baseline_taken_dirties_the_pages_of_its_wave() -> None:
    rec = record(100)
    layout = small(10_000)
    wave = rec.waves[2]
    stats = router_stats(at=5.0)
    after = msgspec.structs.replace(rec, waves=[*rec.waves[:2], msgspec.structs.replace(
        wave, baseline={n: stats for n in wave.nodes}), *rec.waves[3:]])
    assert pages.dirty(rec, after, layout) == {layout.page_of[n] for n in wave.nodes}
    gone = msgspec.structs.replace(rec, waves=[
        msgspec.structs.replace(rec.waves[0], baseline={}), *rec.waves[1:]])
    assert pages.dirty(rec, gone, layout) == {layout.page_of[n] for n in rec.waves[0].nodes}


def test_random_steps_written_as_their_dirty_pages_read_back_exactly() -> None:
    """What a store keeps (the pages as last written, patched with the dirty pages of each step)
    always assembles to the record of that step."""
    rng = random.Random(17)
    rec = record(200, canary=True)
    layout = pages.plan(pages.order(rec), lambda _n: 1000, 8000)
    kept = stored(rec, layout)
    stats = router_stats(at=9.0)
    for _ in range(200):
        after = msgspec.structs.replace(rec, nodes=dict(rec.nodes),
                                        waves=[msgspec.structs.replace(w) for w in rec.waves])
        for _ in range(rng.randint(0, 5)):
            node = rng.choice(list(after.nodes))
            after.nodes[node] = msgspec.structs.replace(
                after.nodes[node], state=rng.choice(["updating", "done", "failed"]),
                target=desired(node, generation=rng.randint(1, 99), release=NEW))
        w = rng.randrange(len(after.waves))
        wave = after.waves[w]
        match rng.randrange(4):
            case 0:
                wave.baseline = {n: stats for n in wave.nodes if rng.random() < 0.5}
            case 1:
                wave.evidence_from = UNSET if rng.random() < 0.5 else {
                    n: stats for n in wave.nodes[:3]}
            case 2:
                wave.nodes = list(reversed(wave.nodes))
            case _:
                pass
        layout = pages.place(after, layout)
        where = pages.positions(after.waves)
        for k in pages.dirty(rec, after, layout):
            kept[k] = pages.page(after, layout, k, where)
        assert pages.assemble(pages.head(after, layout), kept.values()) == after
        rec = after


def test_a_node_without_a_page_gets_a_new_one() -> None:
    rec = record(20)
    layout = pages.plan(pages.order(rec), lambda _n: 1, 100)
    after = msgspec.structs.replace(rec, nodes={**rec.nodes, "late": NodeProgress(node="late")})
    grown = pages.place(after, layout)
    assert grown.pages[-1] == ["late"] and pages.place(after, grown) is grown
    assert pages.dirty(rec, after, grown) == {len(grown.pages) - 1}


def fleet(n: int) -> RolloutRecord:
    views = [NodeView(id=f"sim-{i}", online=True) for i in range(n)]
    current = {v.id: desired(v.id) for v in views}
    return new_record(id="hello-20261202-000000-abcd", release=NEW, nodes=views,
                      spec=spec(batch="10%", max_unavailable="10%"), current=current, now=1.0)


def test_fifty_thousand_nodes_fit_a_default_server() -> None:
    """The default max_payload (1 MiB): the head and each page fit, with the outbox's room."""
    rec = fleet(50_000)
    routers = {n: report(desired(n), 1.0, router_stats()).router for n in list(rec.nodes)}
    head, sizes = worst_case_sizes(rec, {n: r for n, r in routers.items() if r is not None})
    layout = pages.fit(rec, head, sizes, max_payload=1 << 20, reserve=512_000)
    assert len(layout.pages) <= pages.MAX_PAGES
    top, parts = pages.split(Rollout(rec, fleet="f").record, layout)
    assert len(encode(top)) + 512_000 < 1 << 20
    assert max(len(encode(p)) for p in parts) < 1 << 20
    assert pages.assemble(top, parts) == rec
    # With the room each node's events in the outbox take on its page (``Runner._layout``):
    # the greedy cut must still make at most MAX_PAGES pages (it made 401 before it counted
    # the room a cut wastes, and a 50,000-node deploy was refused).
    layout = pages.fit(rec, head, sizes, max_payload=1 << 20, reserve=512_000,
                       node_reserve=NODE_OUTBOX_MAX * EVENT_BYTES)
    assert len(layout.pages) <= pages.MAX_PAGES


def test_a_rollout_that_cannot_be_stored_is_refused_in_one_line() -> None:
    rec = fleet(1000)
    head, sizes = worst_case_sizes(rec, {})
    with pytest.raises(UsageError, match=r"record head .* \(max_payload 6 KiB\); use fewer, "
                                         r"larger waves \(--batch\)"):
        pages.fit(rec, head, sizes, max_payload=2048 + 4096, reserve=0)
    big = fleet(3000)
    head, sizes = worst_case_sizes(big, {})
    with pytest.raises(UsageError, match=r"more than 400 messages .* --selector"):
        pages.fit(big, head, sizes, max_payload=head + 4096 + 1, reserve=0)
    assert pages.fit(rec, head, sizes, max_payload=0, reserve=0).pages  # unknown: no limit


def test_a_started_rollout_splits_and_assembles() -> None:
    rollout = Rollout(fleet(500), fleet="f")
    rollout.handle(Start(), 2.0)
    rec = rollout.record
    layout = pages.plan(pages.order(rec), lambda _n: 2000, pages.PAGE_BYTES)
    assert pages.assemble(*pages.split(rec, layout)) == rec


def test_a_blue_green_whose_switch_report_cannot_fit_the_head_is_refused() -> None:
    """A blue-green's report (in the head) names every node's switch and switch back: on a
    1 MiB server 20,000 nodes of it do not fit, in one line naming the fix."""
    views = [NodeView(id=f"sim-{i}", online=True) for i in range(20_000)]
    rec = new_record(id="hello-bg", release=NEW, nodes=views, now=1.0,
                     spec=spec(strategy="blue-green", batch="100%", max_unavailable="100%"),
                     current={v.id: desired(v.id) for v in views})
    head, sizes = worst_case_sizes(rec, {})
    assert head > 1 << 20
    with pytest.raises(UsageError,
                       match=r"20000 nodes .* record head .*blue-green's report names every "
                             r"node's switch.*max_payload 1.0 MiB.*--selector") as refused:
        pages.fit(rec, head, sizes, max_payload=1 << 20, reserve=512_000)
    assert "--batch" not in str(refused.value)  # fewer waves would not shrink it
    rolling = msgspec.structs.replace(rec, spec=spec(batch="10%", max_unavailable="10%"))
    assert worst_case_sizes(rolling, {})[0] < 100_000


def _event(i: int, node: str = "") -> Event:
    return Event(id=f"e{i}", time=float(i), fleet="f", kind="node.updating" if node else
                 "wave.started", message="m", node=node, rollout="hello-1")


def test_the_outbox_travels_with_its_nodes_pages_and_assembles_in_order() -> None:
    """A wave of thousands of nodes decides thousands of events at once: each is kept on its
    node's page, the rollout's own in the head, and they assemble in the order decided."""
    rec = record(100)
    layout = small(5000)
    rec.outbox = [_event(0), *(_event(i, f"node-{i}") for i in range(1, 60)), _event(60)]
    top, parts = pages.split(rec, layout)
    assert [e.id for e in top.outbox] == ["e0", "e60"]
    for part in parts:
        assert all(layout.page_of[e.node] == part.index for e in part.outbox)
    assert sum(len(p.outbox) for p in parts) == 59
    assert pages.assemble(top, reversed(parts)) == rec


def test_a_changed_outbox_dirties_only_the_pages_of_its_nodes() -> None:
    rec = record(100)
    layout = small(5000)
    after = msgspec.structs.replace(rec, outbox=[_event(1, "node-42"), _event(2)])
    assert pages.dirty(rec, after, layout) == {layout.page_of["node-42"]}
    acked = msgspec.structs.replace(after, outbox=[_event(2)])
    assert pages.dirty(after, acked, layout) == {layout.page_of["node-42"]}
    assert pages.dirty(acked, msgspec.structs.replace(acked, outbox=[]), layout) == set()
