"""Cordons and drains against an in-memory bus: what is stored, what is signed and written to
the nodes, what is told, and what a live rollout refuses."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.errors import RemoteError, UsageError
from coordinator.runtime.cordons import read_cordons
from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict
from protocol.messages import Cordon, DesiredState, DrainSpec, ObservedState, SignedEnvelope
from protocol.signing import public_key, verify
from protocol.testing import FLEET, NEW, FakeBus, FakeClock, spec
from tests.unit.coordinator.runtime.test_runner import (
    DESIRED,
    ROLLOUTS,
    SEED,
    fence,
    fleet_bus,
    runner,
    views,
)

CORDONS = subjects.cordons_bucket(FLEET)


def stored_desired(bus: FakeBus, node: str) -> tuple[SignedEnvelope, DesiredState]:
    entry = bus.live(DESIRED, f"{node}.hello")
    assert entry is not None and entry.value is not None
    env = decode(SignedEnvelope, entry.value)
    return env, decode(DesiredState, env.payload)


async def test_cordon_is_stored_with_who_and_when_told_once_and_skipped_by_a_deploy() -> None:
    """cordon node-3: the cordons bucket holds who and when, node.cordoned names who; a second
    cordon changes nothing; the next deploy leaves node-3 out and says so in its report."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rows = await r.cordon(["node-3"], drain=False, grace=15.0, who="alice")
    assert rows == [{"node": "node-3", "cordoned": True, "drained": False, "changed": True,
                     "by": "alice", "time": clock.t, "grace": 0.0}]
    assert await read_cordons(bus) == {"node-3": Cordon(node="node-3", by="alice", time=clock.t)}
    told = [(e.kind, e.node, e.who) for e in r.events.pending()]
    assert told == [("node.cordoned", "node-3", "alice")]
    assert bus.live(DESIRED, "node-3.hello") is not None and all(
        b != DESIRED for _, b, _, _ in bus.log)  # a cordon writes nothing to the node

    again = await r.cordon(["node-3"], drain=False, grace=15.0, who="bob")
    assert again[0]["changed"] is False and again[0]["by"] == "alice"
    assert r.events.pending() == []

    rec = await r.deploy(spec(), NEW)
    assert sorted(rec.nodes) == ["node-1", "node-2"]
    assert rec.report.skipped_cordoned == ["node-3"]
    stored = [v for _, b, _, v in bus.log if b == ROLLOUTS and v]
    assert b'"skipped_cordoned":["node-3"]' in stored[0]


async def test_drain_signs_the_next_generation_with_drain_and_uncordon_undoes_it() -> None:
    """drain node-2: its desired state again at generation 8, signed, same slots and weights,
    with the drain (grace, who, when); uncordon: generation 9 without it (the JSON has no
    "drain" key again), then the cordon is gone; each step told with who."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    _, before = stored_desired(bus, "node-2")
    rows = await r.cordon(["node-2"], drain=True, grace=30.0, who="alice")
    assert rows[0]["drained"] is True and rows[0]["changed"] is True
    env, drained = stored_desired(bus, "node-2")
    assert env.generation == 8
    assert verify(env, {public_key(SEED)}, fleet=FLEET, node="node-2", service="hello",
                  min_generation=7) == drained  # what an agent on generation 7 accepts
    assert drained.drained == DrainSpec(grace=30.0, since=clock.t, by="alice")
    assert msgspec.structs.replace(drained, generation=7, drain=msgspec.UNSET,
                                   time=before.time) == before
    assert (await read_cordons(bus))["node-2"].drain is True
    assert [e.kind for e in r.events.pending()] == ["node.cordoned", "node.drained"]
    assert [stored_desired(bus, n)[0].generation for n in ("node-1", "node-3")] == [7, 7]

    clock.t += 60
    rows = await r.uncordon(["node-2"], who="bob")
    assert rows == [{"node": "node-2", "cordoned": False, "drained": False, "changed": True}]
    env, undrained = stored_desired(bus, "node-2")
    assert env.generation == 9 and undrained.drained is None and b'"drain"' not in env.payload
    assert await read_cordons(bus) == {}
    assert [(e.kind, e.who) for e in r.events.pending()] == [
        ("node.undrained", "bob"), ("node.uncordoned", "bob")]
    writes = [(b, k) for _, b, k, _ in bus.log if b in (DESIRED, CORDONS)]
    assert writes[-2:] == [(DESIRED, "node-2.hello"), (CORDONS, "node-2")]  # undrained first


async def test_a_rollout_keeps_a_target_cordoned_while_it_runs_but_refuses_its_drain() -> None:
    """A live rollout targets node-1: cordoning it is fine (the record is untouched); draining
    it is a Conflict naming the rollout, and nothing is written."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(batch="1", bake=5.0), NEW)
    before = encode(r.drivers[rec.id].rollout.record)
    await r.cordon(["node-1"], drain=False, grace=15.0, who="alice")
    assert encode(r.drivers[rec.id].rollout.record) == before
    r.events.pending()
    log = list(bus.log)
    with pytest.raises(Conflict, match=rf"cannot drain node-1: rollout {rec.id} targets it"):
        await r.cordon(["node-1"], drain=True, grace=15.0, who="alice")
    assert bus.log == log and r.events.pending() == []


async def test_forget_purges_the_nodes_registration_observed_states_and_cordon() -> None:
    """forget node-3: its nodes, observed and cordons keys are gone (not its desired state: an
    agent that comes back serves what it was told), node.forgotten names who; a node that a
    live rollout targets is refused (Conflict), nothing purged."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    nodes, observed = subjects.nodes_bucket(FLEET), subjects.observed_bucket(FLEET)
    for n in ("node-2", "node-3"):
        bus.set("put", nodes, n, b"{}")
        bus.set("put", observed, f"{n}.hello", b"{}")
    await r.cordon(["node-3"], drain=False, grace=0.0, who="alice")
    r.events.pending()  # (the cordon's event, told)
    rows = await r.forget(["node-3"], who="bob")
    assert rows == [{"node": "node-3", "forgotten": True}]
    assert bus.live(nodes, "node-3") is None and bus.live(observed, "node-3.hello") is None
    assert bus.live(CORDONS, "node-3") is None
    assert bus.live(DESIRED, "node-3.hello") is not None
    assert bus.live(nodes, "node-2") is not None and bus.live(observed, "node-2.hello")
    assert [(e.kind, e.node, e.who) for e in r.events.pending()] == [
        ("node.forgotten", "node-3", "bob")]

    rec = await r.deploy(spec(), NEW)
    assert "node-2" in rec.nodes
    with pytest.raises(Conflict, match=f"cannot forget node-2: rollout {rec.id} targets it"):
        await r.forget(["node-2"], who="bob")
    assert bus.live(nodes, "node-2") is not None


async def test_forget_is_all_or_nothing_and_looks_again_under_the_lock() -> None:
    """A request naming a free node and one a rollout targets forgets neither; a node whose
    agent came back after the API's look is refused under the lock; a forgotten node's observed
    state leaves the runner's cache."""
    bus, clock = fleet_bus(), FakeClock()
    live = {"node-1": (False, True), "node-2": (False, True), "node-3": (False, True)}
    r = runner(bus, clock, views(offline=("node-3",)))
    r._liveness = live.get
    nodes, observed = subjects.nodes_bucket(FLEET), subjects.observed_bucket(FLEET)
    for n in ("node-1", "node-2", "node-3"):
        bus.set("put", nodes, n, b"{}")
    rec = await r.deploy(spec(), NEW)
    target, free = "node-1", "node-3"
    assert target in rec.nodes and free not in rec.nodes
    with pytest.raises(Conflict):
        await r.forget([target, free], who="bob")
    assert bus.live(nodes, free) is not None and bus.live(nodes, target) is not None
    live[free] = (True, True)  # its agent came back
    with pytest.raises(UsageError, match=f"node {free} is online again"):
        await r.forget([free], who="bob")
    assert bus.live(nodes, free) is not None
    live[free] = (False, True)
    r.observed[(free, "hello")] = decode(ObservedState, b'{"node": "%s", "service": "hello"}'
                                         % free.encode())
    bus.set("put", observed, f"{free}.hello", b"{}")
    await r.forget([free], who="bob")
    assert bus.live(nodes, free) is None and (free, "hello") not in r.observed


async def test_a_cordon_key_holding_what_no_coordinator_writes_still_cordons() -> None:
    """A cordon entry that does not decode (what a node's credentials can have the server write
    there: the answer to its own request) does not uncordon the node: its cordon is the newest
    revision that decodes, and the next deploy still leaves it out; a key uncordoned (deleted)
    before the stray write stays uncordoned."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    await r.cordon(["node-3"], drain=False, grace=15.0, who="alice")
    await r.cordon(["node-2"], drain=False, grace=15.0, who="alice")
    await r.uncordon(["node-2"], who="alice")
    stray = b'{"type":"io.nats.jetstream.api.v1.pub_ack","stream":"x"}'
    bus.set("put", CORDONS, "node-3", stray)
    bus.set("put", CORDONS, "node-2", stray)
    assert set(await read_cordons(bus)) == {"node-3"}
    rec = await r.deploy(spec(), NEW)
    assert sorted(rec.nodes) == ["node-1", "node-2"]
    assert rec.report.skipped_cordoned == ["node-3"]



async def test_a_cordon_key_with_no_readable_revision_left_stays_cordoned() -> None:
    """More stray writes than the bucket keeps revisions (5) leave nothing readable: the node
    counts as cordoned (by "unknown") rather than uncordoned, until an operator uncordons it
    (found by a review: it failed open)."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    await r.cordon(["node-3"], drain=False, grace=15.0, who="alice")
    stray = b'{"type":"io.nats.jetstream.api.v1.pub_ack","stream":"x"}'
    for _ in range(6):
        bus.set("put", CORDONS, "node-3", stray)
    bus.kept[(CORDONS, "node-3")] = bus.kept[(CORDONS, "node-3")][-5:]  # as the bucket keeps
    assert (await read_cordons(bus))["node-3"].by == "unknown"
    rec = await r.deploy(spec(), NEW)
    assert rec.report.skipped_cordoned == ["node-3"]


async def test_a_drain_over_an_unreadable_desired_state_says_to_deploy_again() -> None:
    """node-2's desired state is unreadable (no coordinator wrote it): the drain cannot sign
    its next generation, and says to deploy again (a deploy plans from the last readable
    revision); it used to say to delete the key, which starts again at generation 1, which the
    node refuses for ever (found by a review)."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    bus.set("put", DESIRED, "node-2.hello", b"junk")
    with pytest.raises(BusError) as info:
        await r.cordon(["node-2"], drain=True, grace=30.0, who="alice")
    said = str(info.value)
    assert "deploy hello again to that node" in said and "delete" not in said, said


async def test_a_deposed_leader_cannot_undo_its_successors_cordon() -> None:
    """Cordons are fenced like every write of a leader: once a successor (term 2) has fenced
    the bucket and cordoned node-3, the deposed leader (term 1), waking mid-``uncordon``,
    deletes nothing and stops leading; its own late cordon of node-2 does not land either."""
    bus, clock = fleet_bus(), FakeClock()
    old, late = runner(bus, clock), runner(bus, clock)
    fence(bus, 2)
    new = runner(bus, clock)
    await new.cordon(["node-3"], drain=False, grace=0.0, who="bob")
    with pytest.raises(RemoteError, match="lost the lead during the uncordon"):
        await old.uncordon(["node-3"], who="alice")
    assert old.deposed is not None and old.lost.is_set()
    assert await read_cordons(bus) == {"node-3": Cordon(node="node-3", by="bob", time=clock.t)}
    with pytest.raises(RemoteError, match="lost the lead during the cordon"):
        await late.cordon(["node-2"], drain=False, grace=0.0, who="alice")
    assert "node-2" not in await read_cordons(bus)


async def test_the_fence_is_no_cordon() -> None:
    """The bucket's fence marker (key ``_fence``) is read as nobody's cordon, with no warning."""
    bus = fleet_bus()
    assert bus.live(CORDONS, subjects.FENCE_KEY) is not None
    assert await read_cordons(bus) == {}
