"""The node table in virtual time: online/offline transitions, views and selectors."""

from __future__ import annotations

import pytest

from coordinator.core.fleet import (
    MAX_INTERVAL,
    MIN_INTERVAL,
    Fleet,
    matches,
    parse_selector,
)
from protocol.errors import ProtocolError
from protocol.messages import FEATURE_BATCH, Heartbeat, NodeInfo, ServiceSummary

T0 = 1_700_000_000.0


def hb(node: str, interval: float = 2.0, **kw: object) -> Heartbeat:
    return Heartbeat(node=node, interval=interval, **kw)  # type: ignore[arg-type]


def test_first_heartbeat_brings_a_node_online_once() -> None:
    """A node's first heartbeat emits node.online; later heartbeats emit nothing."""
    f = Fleet()
    [t] = f.heartbeat(hb("n1"), T0)
    assert (t.kind, t.node) == ("node.online", "n1")
    assert f.heartbeat(hb("n1"), T0 + 2) == []
    assert f.view()[0].online


def test_offline_only_after_three_missed_heartbeats() -> None:
    """A node stays online up to 3 intervals after its last beat and goes offline just after."""
    f = Fleet()
    f.heartbeat(hb("n1", interval=2.0), T0)
    assert f.tick(T0 + 6.0) == []
    [t] = f.tick(T0 + 6.01)
    assert (t.kind, t.node) == ("node.offline", "n1")
    assert "3 x 2s" in t.message
    assert f.tick(T0 + 100) == []  # no second offline transition
    assert not f.view()[0].online


def test_silence_while_the_coordinator_was_deaf_is_excused() -> None:
    """After ``excuse(until)`` no node goes offline before 3 of its intervals past ``until``;
    nodes that beat again stay online, silent ones go offline then, and excuses never shrink."""
    f = Fleet()
    f.heartbeat(hb("n1", interval=1.0), T0)
    f.heartbeat(hb("n2", interval=1.0), T0)
    f.excuse(T0 + 10.0)  # e.g. the broker was down from T0 to T0 + 5, plus 5 s of reconnects
    f.excuse(T0 + 4.0)
    assert f.tick(T0 + 13.0) == []
    assert f.next_deadline() == T0 + 13.0
    f.heartbeat(hb("n1", interval=1.0), T0 + 12.0)
    [t] = f.tick(T0 + 13.01)
    assert (t.kind, t.node) == ("node.offline", "n2")
    assert f.tick(T0 + 15.01)[0].node == "n1"


def test_offline_deadline_follows_the_announced_interval() -> None:
    """The deadline is 3 x the interval the node announces, not a global constant."""
    f = Fleet()
    f.heartbeat(hb("fast", interval=0.2), T0)
    f.heartbeat(hb("slow", interval=10.0), T0)
    assert [t.node for t in f.tick(T0 + 1.0)] == ["fast"]
    assert f.next_deadline() == pytest.approx(T0 + 30.0)


def test_a_shorter_interval_announced_later_is_honoured_between_scans() -> None:
    """``tick`` skips the scan until the earliest deadline it knows of; a heartbeat that
    announces a shorter interval brings that point forward, so the node still goes offline on
    time, and a node that beats on stays online however many ticks pass."""
    f = Fleet()
    f.heartbeat(hb("n1", interval=10.0), T0)
    f.heartbeat(hb("n2", interval=10.0), T0)
    assert f.tick(T0 + 1.0) == []
    f.heartbeat(hb("n1", interval=0.5), T0 + 2.0)  # deadline now T0 + 3.5, not T0 + 30
    for i in range(1, 30):  # n2 beats every second on its 10 s interval
        f.heartbeat(hb("n2", interval=10.0), T0 + 2.0 + i * 0.1)
    assert f.tick(T0 + 3.5) == []
    assert [t.node for t in f.tick(T0 + 3.51)] == ["n1"]
    for i in range(1, 60):
        f.heartbeat(hb("n2", interval=10.0), T0 + 3.0 + i)
        assert f.tick(T0 + 3.0 + i + 0.5) == []
    assert [t.node for t in f.tick(T0 + 62.0 + 30.01)] == ["n2"]


def test_node_comes_back_online_after_offline() -> None:
    """A heartbeat after an offline transition emits node.online again."""
    f = Fleet()
    f.heartbeat(hb("n1"), T0)
    f.tick(T0 + 10)
    [t] = f.heartbeat(hb("n1"), T0 + 20)
    assert t.kind == "node.online"
    assert f.view()[0].last_seen == T0 + 20


def test_registration_is_a_sign_of_life_and_sets_labels() -> None:
    """register() brings a node online and its NodeInfo labels win over heartbeat labels."""
    f = Fleet()
    [t] = f.register(NodeInfo(id="n1", labels={"zone": "a"}), T0)
    assert t.kind == "node.online" and t.data["labels"] == {"zone": "a"}
    f.heartbeat(hb("n1", labels={"zone": "stale"}), T0 + 1)
    assert f.view()[0].labels == {"zone": "a"}


def test_loaded_nodes_are_known_but_offline() -> None:
    """Nodes loaded from the nodes bucket show offline with no figures until they beat."""
    f = Fleet()
    f.load(NodeInfo(id="n1", labels={"role": "web"}))
    [v] = f.view()
    assert (v.online, v.last_seen, v.cpu_percent, v.labels) == (False, None, None, {"role": "web"})
    assert f.tick(T0) == []
    assert f.next_deadline() is None


def test_loaded_nodes_are_not_heard_yet_until_the_listening_grace_is_over() -> None:
    """A coordinator that has just started cannot know: after ``listen(now, grace)`` a loaded node
    not heard from is *not heard yet* (not online, not offline, listed after the offline
    ones) until ``until``, or until it beats; then those still silent are offline."""
    f = Fleet()
    for i in (1, 2, 3):
        f.load(NodeInfo(id=f"n{i}"))
    f.heartbeat(hb("n3", interval=1.0), T0 - 10)
    f.tick(T0)  # n3: offline, heard from before
    f.listen(T0, 12)
    assert [(v.id, v.online, v.unheard) for v in f.view()] == [
        ("n1", False, True), ("n2", False, True), ("n3", False, False)]
    assert f.page(None, 1)[0][0].id == "n3"  # the offline one wants a look first
    assert f.page(None, 5)[1:] == (3, 0, 2)
    [t] = f.heartbeat(hb("n1", interval=10.0), T0 + 3)
    assert t.kind == "node.online" and f.page(None, 5)[1:] == (3, 1, 1)
    assert f.tick(T0 + 11.9) == [] and [v.unheard for v in f.view()] == [False, True, False]
    assert f.tick(T0 + 12) == []  # never online: no transition, offline from now on
    assert [(v.online, v.unheard) for v in f.view(services=False)] == [
        (True, False), (False, False), (False, False)]
    assert f.page(None, 5)[1:] == (3, 1, 0)


def test_the_window_starts_again_after_a_time_the_coordinator_could_not_hear() -> None:
    """``excuse`` (the bus was away until then) gives a node not heard yet its grace again,
    and ``liveness`` says whether the table knows: heard from, or its window over."""
    f = Fleet()
    f.load(NodeInfo(id="n1"))
    f.load(NodeInfo(id="n2"))
    f.listen(T0, 12)
    assert f.liveness("n1") == (False, False) and f.liveness("nx") is None
    f.heartbeat(hb("n2", interval=100.0), T0 + 1)
    assert f.liveness("n2") == (True, True)
    f.excuse(T0 + 8)  # deaf until T0 + 8: n1 has until T0 + 20
    f.tick(T0 + 19)
    assert f.liveness("n1") == (False, False) and f.unheard() == ["n1"]
    f.excuse(T0 + 19.5, deaf=False)  # only the nodes' pace grew: the window stays
    f.tick(T0 + 20)
    assert f.liveness("n1") == (False, True) and f.unheard() == []


def test_unheard_lists_the_matching_nodes_not_heard_yet() -> None:
    """What a deploy waits for: the nodes a selector matches that are not heard yet."""
    f = Fleet()
    f.load(NodeInfo(id="n1", labels={"zone": "a"}))
    f.load(NodeInfo(id="n2", labels={"zone": "b"}))
    f.load(NodeInfo(id="n3", labels={"zone": "a"}))
    f.register(NodeInfo(id="n3", labels={"zone": "a"}), T0 - 20)  # heard before: offline now
    f.tick(T0)
    f.listen(T0, 12)
    assert sorted(f.unheard()) == ["n1", "n2"] and f.unheard({"zone": "a"}) == ["n1"]
    f.heartbeat(hb("n1"), T0 + 1)
    assert f.unheard({"zone": "a"}) == []
    f.tick(T0 + 12)
    assert f.unheard() == []


def test_beating_counts_the_online_the_not_heard_yet_and_the_lately_offline() -> None:
    """What the leader paces: online nodes, those not heard yet, and those offline for less
    than the memory (a busy leader's missed beats must not shorten the pace); not the rest."""
    f = Fleet()
    for i in (1, 2, 3):
        f.load(NodeInfo(id=f"n{i}"))
    f.listen(T0, 12)
    assert f.beating(T0) == 3
    f.heartbeat(hb("n1", interval=1.0), T0)
    f.heartbeat(hb("n4", interval=100.0), T0)  # never loaded: online at once
    assert (f.online_count, f.beating(T0)) == (2, 4)
    f.tick(T0 + 3.5)  # n1 offline: still counted for the memory
    assert (f.online_count, f.beating(T0 + 3.5, memory=60)) == (1, 4)
    f.tick(T0 + 12)  # n2 and n3 never beat: offline, never counted again
    assert f.beating(T0 + 12, memory=60) == 2
    assert f.beating(T0 + 64, memory=60) == 1  # n1 offline for longer than the memory
    f.heartbeat(hb("n1", interval=1.0), T0 + 65)
    assert (f.online_count, f.beating(T0 + 65, memory=60)) == (2, 2)


def test_a_forgotten_node_leaves_every_view_and_count() -> None:
    f = Fleet()
    for i in (1, 2, 3):
        f.heartbeat(hb(f"n{i}", interval=1.0), T0)
    assert [v.id for v in f.view()] == ["n1", "n2", "n3"]  # (sorted once: kept)
    f.heartbeat(hb("n1", interval=1.0), T0 + 3.5)
    f.tick(T0 + 4)  # n2, n3 offline; n1 online
    assert not f.forget("n1")  # online (its agent came back): it stays
    f.tick(T0 + 7)
    assert f.forget("n2") and not f.forget("n2") and not f.forget("nx")
    f.heartbeat(hb("n4", interval=1.0), T0 + 4)  # one added: as many nodes as before
    assert [v.id for v in f.view()] == ["n1", "n3", "n4"] and f.page(None, 9)[1:] == (3, 1, 0)
    assert f.liveness("n2") is None and f.beating(T0 + 8, memory=0) == 1
    f.heartbeat(hb("n2", interval=1.0), T0 + 5)  # it beats again: a node again
    assert [v.id for v in f.view() if v.online] == ["n2", "n4"]


def test_view_carries_figures_and_services() -> None:
    """The view shows the last heartbeat's cpu, memory and services keyed by name."""
    f = Fleet()
    f.heartbeat(
        hb("n1", cpu_percent=12.5, mem_percent=40.0,
           services=[ServiceSummary(service="hello", version="2.0.0", healthy=True)]),
        T0,
    )
    [v] = f.view()
    assert (v.cpu_percent, v.mem_percent) == (12.5, 40.0)
    assert v.services["hello"]["version"] == "2.0.0"
    assert v.services["hello"]["healthy"] is True
    [light] = f.view(services=False)  # what planning reads: the rest left out
    assert (light.id, light.online, light.last_seen, light.labels) == (
        v.id, v.online, v.last_seen, v.labels)
    assert (light.services, light.cpu_percent, light.mem_percent) == ({}, None, None)


def test_view_filters_by_selector_and_sorts_naturally() -> None:
    """Only nodes carrying every selector pair are listed, node-2 before node-10."""
    f = Fleet()
    for i, zone in ((10, "a"), (2, "a"), (3, "b")):
        f.register(NodeInfo(id=f"node-{i}", labels={"zone": zone, "role": "web"}), T0)
    assert [v.id for v in f.view({"zone": "a"})] == ["node-2", "node-10"]
    assert [v.id for v in f.view()] == ["node-2", "node-3", "node-10"]
    assert f.view({"zone": "a", "role": "db"}) == []
    assert f.online_ids({"zone": "b"}) == ["node-3"]
    f.heartbeat(hb("node-4"), T0)  # a node first heard of after a view: in its place
    assert [v.id for v in f.view()] == ["node-2", "node-3", "node-4", "node-10"]


def test_a_page_shows_offline_and_held_nodes_first_and_counts_every_node() -> None:
    """``page`` (the dashboard's bounded view): offline nodes and those named ``ahead``
    (cordoned) first, the rest by id up to ``most``, shown in natural order, rows equal to
    ``view``'s; the counts cover every matching node."""
    f = Fleet()
    for i in range(1, 13):
        f.heartbeat(hb(f"node-{i}", interval=1.0), T0)
    f.heartbeat(hb("node-11", interval=1.0), T0 + 10)
    f.tick(T0 + 10)  # all but node-11 offline
    for i in range(1, 11):
        f.heartbeat(hb(f"node-{i}", interval=1.0), T0 + 10)  # back: node-12 stays offline
    rows, count, online, unheard = f.page(None, 4, ahead={"node-7", "node-9"})
    assert [r.id for r in rows] == ["node-1", "node-7", "node-9", "node-12"]
    assert (count, online, unheard) == (12, 11, 0)
    assert rows == [v for v in f.view() if v.id in {r.id for r in rows}]
    rows, *_ = f.page(None, 2, ahead={"node-7", "node-9"})
    assert [r.id for r in rows] == ["node-7", "node-9"]  # of the three that want a look, by id
    everything, count, *_ = f.page(None, 100)
    assert everything == f.view() and count == 12
    f.register(NodeInfo(id="node-3", labels={"zone": "b"}), T0 + 10)
    assert f.page({"zone": "b"}, 5)[0:2] == ([f.view({"zone": "b"})[0]], 1)


@pytest.mark.parametrize(
    ("announced", "effective"),
    [(0.0, MIN_INTERVAL), (-5.0, MIN_INTERVAL), (1e9, MAX_INTERVAL), (float("nan"), 2.0)],
)
def test_hostile_intervals_are_clamped(announced: float, effective: float) -> None:
    """A zero, negative, huge or NaN interval cannot make a node immortal or flap."""
    f = Fleet()
    f.heartbeat(hb("n1", interval=announced), T0)
    assert f.nodes["n1"].interval == effective


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {}, True),
        ({}, {"zone": "a"}, True),
        ({"zone": "a"}, {"zone": "a", "role": "web"}, True),
        ({"zone": "a"}, {"zone": "b"}, False),
        ({"zone": "a"}, {}, False),
        ({"zone": "a", "role": "web"}, {"zone": "a"}, False),
    ],
)
def test_matches(selector: dict[str, str], labels: dict[str, str], expected: bool) -> None:
    """A selector matches when every pair is carried by the labels."""
    assert matches(selector, labels) is expected


def test_parse_selector_accepts_repeats_and_commas() -> None:
    """Repeated flags and comma lists both build one selector."""
    got = parse_selector(["zone=a", "role=web,tier=1"])
    assert got == {"zone": "a", "role": "web", "tier": "1"}
    assert parse_selector([]) == {}
    assert parse_selector(["zone=a", "zone=a"]) == {"zone": "a"}


@pytest.mark.parametrize("bad", ["zone", "=a", "zone=", "zone=a b", "zo ne=a", "a=b=c"])
def test_parse_selector_refuses_malformed_items(bad: str) -> None:
    """A malformed item is refused with a message naming it."""
    with pytest.raises(ProtocolError, match="not key=value"):
        parse_selector([bad])


def test_parse_selector_refuses_contradictions() -> None:
    """The same key with two values is refused rather than silently picking one."""
    with pytest.raises(ProtocolError, match="twice"):
        parse_selector(["zone=a", "zone=b"])


def test_only_nodes_whose_agent_says_so_take_batch_signatures() -> None:
    """An agent that registered ``batch-signatures`` takes them; one too old to say (or only
    heard by heartbeat, or unknown) gets states signed alone, which every agent verifies."""
    f = Fleet()
    f.register(NodeInfo(id="new", features=[FEATURE_BATCH]), T0)
    f.register(NodeInfo(id="old"), T0)
    f.heartbeat(hb("beating"), T0)
    assert f.takes_batch_signatures("new")
    assert not any(f.takes_batch_signatures(n) for n in ("old", "beating", "unknown"))


def test_offline_ids_are_the_offline_nodes_longest_gone_first() -> None:
    """What a coordinator's sweep looks up in the nodes bucket: offline nodes only (not the
    online, not the *not heard yet*), those offline longest first, at most ``most``."""
    f = Fleet()
    f.load(NodeInfo(id="loaded"))
    f.heartbeat(hb("n1", interval=1.0), T0)
    f.heartbeat(hb("n2", interval=1.0), T0 - 5)
    f.heartbeat(hb("n3", interval=1.0), T0 + 10)
    f.listen(T0 + 10, 60)  # "loaded" is not heard yet
    f.tick(T0 + 10)  # n1, n2 offline; n3 online
    assert f.offline_ids(9) == ["n2", "n1"]
    assert f.offline_ids(1) == ["n2"]


def test_changes_count_every_change_of_liveness_and_no_heartbeat_of_an_online_node() -> None:
    """``changes`` moves whenever ``liveness`` would answer otherwise for some node (known,
    heard, online, offline, forgotten, its window over), and stays over heartbeats of online
    nodes and a reload of a known node: the runner's tick looks at every node only when it
    moved."""
    f = Fleet()
    seen = [f.changes]

    def moved() -> bool:
        seen.append(f.changes)
        return seen[-1] != seen[-2]

    f.load(NodeInfo(id="n1"))
    f.load(NodeInfo(id="n2"))
    assert moved()
    f.load(NodeInfo(id="n1"))
    assert not moved()
    f.listen(T0, 10)
    assert moved()
    f.heartbeat(hb("n1", interval=5.0), T0)
    assert moved()  # online, heard
    f.heartbeat(hb("n1", interval=5.0), T0 + 1)
    f.register(NodeInfo(id="n1"), T0 + 1.5)
    assert f.tick(T0 + 2) == [] and not moved()
    f.tick(T0 + 10)  # n2's window is over: offline, never heard
    assert moved() and f.liveness("n2") == (False, True)
    f.tick(T0 + 10)
    assert not moved()
    [t] = f.tick(T0 + 20)  # n1 silent for three beats of 5 s
    assert t.kind == "node.offline" and moved()
    f.heartbeat(hb("n1"), T0 + 21)
    assert moved() and f.liveness("n1") == (True, True)
    f.heartbeat(hb("n3"), T0 + 22)  # a new node
    assert moved()
    assert f.forget("n2") and moved() and f.liveness("n2") is None
