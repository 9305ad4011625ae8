"""agent.manager.desired: a restarted agent whose remembered desired state no longer verifies
still refuses replays (the floor survives the restore); a state of a lower lease term than the
one it runs is refused, also after a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.host.state import AgentState, ServiceRecord, save_state
from agent.manager.shell import ServiceManager
from protocol.codec import encode
from protocol.messages import DesiredState, Pace
from protocol.signing import generate_seed, public_key, sign

NODE, FLEET, SERVICE = "node-1", "default", "hello"


def _env(seed: bytes, generation: int, term: int = 0) -> Any:
    return sign(seed, DesiredState(fleet=FLEET, node=NODE, service=SERVICE,
                                   generation=generation), term=term)


def _manager(tmp_path: Path, trusted: list[str]) -> ServiceManager:
    return ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                          bind_host="127.0.0.1", trusted_keys=trusted)


async def test_replay_is_refused_after_the_remembered_envelope_fails_to_verify(
    tmp_path: Path,
) -> None:
    """Generation 7 was accepted under an old key; after a key change, generation 3 is a replay."""
    old, new = generate_seed(), generate_seed()
    mgr = _manager(tmp_path, [public_key(new)])
    save_state(mgr.restorer.state_path, AgentState(services={
        SERVICE: ServiceRecord(service=SERVICE, envelope=_env(old, 7), generation=7),
    }))
    await mgr.restorer.restore(lambda *_: None)
    assert mgr.services[SERVICE].desired is None  # the old key is no longer trusted
    await mgr.desired.offer(f"{NODE}.{SERVICE}", encode(_env(new, 3)))
    assert mgr.services[SERVICE].desired is None
    assert mgr.desired.refused == 1
    await mgr.desired.offer(f"{NODE}.{SERVICE}", encode(_env(new, 8)))
    desired = mgr.services[SERVICE].desired
    assert desired is not None and desired.generation == 8


async def test_a_deposed_leaders_state_is_refused_even_after_a_restart(tmp_path: Path) -> None:
    """Running term 5's generation 8, the agent refuses term 4's generation 9 (a deposed leader
    or a replay); a restarted agent remembers the term; term 5's generation 9 is accepted."""
    seed = generate_seed()
    mgr = _manager(tmp_path, [public_key(seed)])
    await mgr.desired.offer(f"{NODE}.{SERVICE}", encode(_env(seed, 8, term=5)))
    await mgr.desired.offer(f"{NODE}.{SERVICE}", encode(_env(seed, 9, term=4)))
    desired = mgr.services[SERVICE].desired
    assert desired is not None and desired.generation == 8 and mgr.desired.refused == 1
    mgr.restorer.save_now()
    again = _manager(tmp_path, [public_key(seed)])
    await again.restorer.restore(lambda *_: None)
    await again.desired.offer(f"{NODE}.{SERVICE}", encode(_env(seed, 9, term=4)))
    assert again.desired.refused == 1
    await again.desired.offer(f"{NODE}.{SERVICE}", encode(_env(seed, 9, term=5)))
    desired = again.services[SERVICE].desired
    assert desired is not None and desired.generation == 9


async def test_a_state_file_of_another_node_or_fleet_is_not_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A data dir reused under another node id or fleet (a cloned VM image, a renamed node, a
    changed --fleet): the state file's records are ignored (one line says whose they were), and
    this node's own first desired state, of a lower generation and term, is accepted."""
    import logging

    seed = generate_seed()
    for theirs in (AgentState(node="web-7", fleet=FLEET), AgentState(node=NODE, fleet="other")):
        theirs.services = {SERVICE: ServiceRecord(
            service=SERVICE, generation=12,
            envelope=sign(seed, DesiredState(fleet=theirs.fleet, node=theirs.node,
                                             service=SERVICE, generation=12), term=3))}
        save_state(tmp_path / "state.json", theirs)
        mgr = _manager(tmp_path, [public_key(seed)])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fleetwave.agent.services"):
            await mgr.restorer.restore(lambda *_: None)
        assert SERVICE not in mgr.services
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and "belonged to" in said[0] and "is ignored" in said[0]
        await mgr.desired.offer(f"{NODE}.{SERVICE}", encode(_env(seed, 1, term=2)))
        desired = mgr.services[SERVICE].desired
        assert desired is not None and desired.generation == 1 and mgr.desired.refused == 0


async def test_a_remembered_envelope_addressed_elsewhere_sets_no_floor(tmp_path: Path) -> None:
    """A file that names no node (an older agent's) holding another node's envelope: neither its
    generation nor its term refuses this node's own desired states; the file's slots are kept."""
    seed = generate_seed()
    other = sign(seed, DesiredState(fleet=FLEET, node="web-7", service=SERVICE, generation=12),
                 term=3)
    save_state(tmp_path / "state.json", AgentState(services={
        SERVICE: ServiceRecord(service=SERVICE, envelope=other, generation=12,
                               observed_generation=12),
    }))
    mgr = _manager(tmp_path, [public_key(seed)])
    await mgr.restorer.restore(lambda *_: None)
    svc = mgr.services[SERVICE]
    assert svc.floor == 0 and svc.envelope is None and svc.desired is None
    await mgr.desired.offer(f"{NODE}.{SERVICE}", encode(_env(seed, 1, term=2)))
    desired = mgr.services[SERVICE].desired
    assert desired is not None and desired.generation == 1 and mgr.desired.refused == 0


def test_the_state_file_names_its_node_and_fleet(tmp_path: Path) -> None:
    """What the agent saves says whose it is, so that a reused data dir is recognised."""
    mgr = _manager(tmp_path, [])
    assert (mgr.restorer._snapshot().node, mgr.restorer._snapshot().fleet) == (NODE, FLEET)


# -- the re-read's pace ---------------------------------------------------------------------------


def test_reread_every_keeps_a_large_fleets_rereads_at_the_rate() -> None:
    """30 s up to 2,000 nodes; then the size rounded up to 1,000 times a power of two over 100
    a second (a fleet of 3,000 re-reads every 40 s, of 10,000 every 160 s); never past 10
    minutes, however large a (forged) pace says the fleet is; a nonsense size changes
    nothing; sizes between two doublings re-read alike."""
    from agent.manager.desired import reread_every

    assert reread_every(0) == 30.0
    assert reread_every(2_000) == 30.0
    assert reread_every(3_000) == reread_every(4_000) == 40.0
    assert reread_every(10_000) == reread_every(16_000) == 160.0
    assert reread_every(50_000) == 600.0
    assert reread_every(10**9) == 600.0
    assert reread_every(-7) == 30.0


class _Rereads:
    """A bus whose snapshot of the node's keys is empty, counting the reads."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    async def kv_entries(self, bucket: str, pattern: str) -> list[Any]:
        self.reads.append(pattern)
        return []


async def test_the_reread_waits_as_the_fleets_size_says(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    """Each wait is drawn around ``reread_every`` of the size the pace named (half to one and a
    half of it), and a read of this node's keys follows each: 30 s alone, 600 s at 50,000."""
    import asyncio
    import contextlib

    import agent.manager.desired as desired_mod

    bus = _Rereads()
    mgr = ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                         bind_host="127.0.0.1", trusted_keys=[])
    mgr.attach(bus)  # type: ignore[arg-type]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            mgr.paced(Pace(interval=25.0, nodes=50_000, rate=2000.0))  # heard meanwhile
        if len(waits) == 4:
            raise asyncio.CancelledError

    monkeypatch.setattr(desired_mod.asyncio, "sleep", sleep)
    draws = iter([0.5, 1.5, 0.5, 1.5])
    monkeypatch.setattr(desired_mod.random, "uniform", lambda a, b: next(draws))
    with contextlib.suppress(asyncio.CancelledError):
        await mgr.desired.reread()
    assert waits == [15.0, 45.0, 300.0, 900.0]
    assert bus.reads == [f"{NODE}.*"] * 3 and mgr.desired.rereads == 3


class _Silent:
    """A bus that never answers (a broker gone quiet): a read waits for ever."""

    async def kv_entries(self, bucket: str, pattern: str) -> list[Any]:
        import asyncio

        await asyncio.Event().wait()
        return []


async def test_a_reread_that_times_out_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A re-read of desired states that gets no answer within BUS_TIMEOUT: its log line ends
    with "timed out", not an empty reason."""
    import asyncio
    import contextlib
    import logging

    import agent.manager.desired as desired_mod

    monkeypatch.setattr(desired_mod, "BUS_TIMEOUT", 0.01)
    monkeypatch.setattr(desired_mod, "reread_every", lambda nodes: 0.01)
    mgr = ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                         bind_host="127.0.0.1", trusted_keys=[])
    mgr.attach(_Silent())  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="fleetwave.agent.services"):
        running = asyncio.create_task(mgr.desired.reread())
        for _ in range(200):
            if caplog.records:
                break
            await asyncio.sleep(0.01)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert caplog.records[0].getMessage() == "cannot re-read desired states: timed out"


def test_watch_heartbeat_keeps_a_large_fleets_at_the_rate() -> None:
    """1 s up to 8,000 nodes; then the size rounded up to 1,000 times a power of two over
    10,000 a second; never past 5 s."""
    from agent.manager.desired import watch_heartbeat

    assert watch_heartbeat(0) == 1.0
    assert watch_heartbeat(8_000) == 1.0
    assert watch_heartbeat(10_000) == watch_heartbeat(16_000) == 1.6
    assert watch_heartbeat(20_000) == 3.2
    assert watch_heartbeat(50_000) == 5.0
    assert watch_heartbeat(10**9) == 5.0


async def test_a_reread_renews_a_watch_whose_heartbeat_the_fleet_outgrew(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    """The watch started at 1 s; the pace then names 50,000 nodes: the next re-read renews the
    watch (whose full read stands for it) instead of reading; once the new watch asked for
    5 s, re-reads read again."""
    import asyncio
    import contextlib

    import agent.manager.desired as desired_mod

    bus = _Rereads()
    mgr = ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                         bind_host="127.0.0.1", trusted_keys=[])
    mgr.attach(bus)  # type: ignore[arg-type]
    watch = mgr.desired
    assert watch._heartbeat() == 1.0  # as the watch asks at its start
    mgr.paced(Pace(interval=25.0, nodes=50_000, rate=2000.0))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            assert watch._renew.is_set() and bus.reads == []
            assert watch._heartbeat() == 5.0  # the renewed watch's start
        if len(waits) == 3:
            raise asyncio.CancelledError

    monkeypatch.setattr(desired_mod.asyncio, "sleep", sleep)
    with contextlib.suppress(asyncio.CancelledError):
        await watch.reread()
    assert watch.renewals == 1 and watch.rereads == 1 and bus.reads == [f"{NODE}.*"]


def test_restart_spread_keeps_a_fleets_new_watches_at_the_rate() -> None:
    """After a reconnect a watch starts within the fleet's size over 500 a second: at once
    before a pace is heard, 2 s at 1,000 nodes, 100 s at 50,000; never past 120 s (a forged
    pace naming a billion nodes)."""
    from agent.manager.desired import restart_spread

    assert restart_spread(0) == 0.0
    assert restart_spread(-5) == 0.0
    assert restart_spread(1_000) == 2.0
    assert restart_spread(10_000) == 20.0
    assert restart_spread(50_000) == 100.0
    assert restart_spread(10**9) == 120.0


class _Watches:
    """A bus whose watch records the spread it was given, then ends the test."""

    waited = False  # its first connect found the server at once

    def __init__(self) -> None:
        self.spreads: list[float] = []
        self.between: Any = lambda: None  # what happens between the two watches

    def watch(self, bucket: str, pattern: str, **kwargs: Any) -> Any:
        import asyncio

        spread = kwargs["spread"]

        async def gen() -> Any:
            self.spreads.append(spread())
            if len(self.spreads) == 2:
                raise asyncio.CancelledError
            self.between()
            yield None

        return gen()


async def test_the_desired_watch_spreads_its_restarts_by_the_fleets_size(
    tmp_path: Path,
) -> None:
    """The agent's watch hands the bus a spread that follows the size the leader's pace names
    at the moment of the restart (asked each time, not fixed at the watch's start)."""
    import asyncio
    import contextlib

    bus = _Watches()
    mgr = ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                         bind_host="127.0.0.1", trusted_keys=[])
    mgr.attach(bus)  # type: ignore[arg-type]
    assert mgr.desired._spread() == 0.0
    mgr.paced(Pace(interval=25.0, nodes=50_000, rate=2000.0))
    bus.between = lambda: mgr.paced(Pace(interval=25.0, nodes=10_000, rate=2000.0))
    with contextlib.suppress(asyncio.CancelledError):
        await mgr.desired.watch()
    assert bus.spreads == [100.0, 20.0]


async def test_a_restarted_agent_starts_from_the_fleets_size_it_last_heard(
    tmp_path: Path,
) -> None:
    """The state file keeps the size of the last pace, rounded up as paces are: a restarted
    agent's first watch asks for the heartbeat (and backs off, and spreads after a reconnect)
    as a 50,000-node fleet's agent, not as one alone, until a pace says it again. A pace heard
    before the file is read wins; a file of an older agent (no size) starts from none."""
    from agent.manager.desired import restart_spread

    mgr = _manager(tmp_path, [])
    mgr.paced(Pace(interval=25.0, nodes=50_000, rate=2000.0))
    mgr.restorer.save_now()
    again = _manager(tmp_path, [])
    assert again.desired.fleet_nodes == 0
    await again._restore()
    assert again.desired.fleet_nodes == 64_000
    assert again.desired._heartbeat() == 5.0 and again.desired._spread() == restart_spread(64_000)
    heard = _manager(tmp_path, [])
    heard.paced(Pace(interval=25.0, nodes=3_000, rate=2000.0))
    await heard._restore()
    assert heard.desired.fleet_nodes == 3_000
    mgr.restorer.state_path.write_text('{"schema":1,"node":"node-1","services":{}}')  # older
    old = _manager(tmp_path, [])
    await old._restore()
    assert old.desired.fleet_nodes == 0
    assert again.restorer._snapshot().fleet_nodes == 64_000  # read back, saved as it was


class _Crowd:
    crowded = False
    waited = False


async def test_a_large_fleets_agent_waits_for_the_pace_and_spreads_its_first_watch_in_a_burst(
    tmp_path: Path,
) -> None:
    """Remembering a fleet of 20,000 (a spread of 40 s), the agent waits for the leader's pace
    before its first watch; a pace that says many agents register at once (``Pace.burst``)
    makes that watch start within the spread (``Bus.crowded``); one that does not lets it
    start at once, as soon as it is heard."""
    import asyncio

    for burst in (True, False):
        bus = _Crowd()
        mgr = ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                             bind_host="127.0.0.1", trusted_keys=[])
        mgr.attach(bus)  # type: ignore[arg-type]
        mgr.desired.fleet_nodes = 20_000  # as restored from the state file
        waiting = asyncio.create_task(mgr.desired._before_first_watch())
        await asyncio.sleep(0)  # a yield: the task runs up to its first wait
        assert not waiting.done()  # waiting for a pace (it would have returned at once)
        mgr.paced(Pace(interval=10.0, nodes=20_000, rate=2000.0, burst=burst))
        await asyncio.wait_for(waiting, 1)
        assert bus.crowded is burst


async def test_an_agent_that_waited_for_its_server_does_not_wait_for_the_pace(
    tmp_path: Path,
) -> None:
    """Its first connect waited for its server (the broker down too: a power cut), so its first
    watch starts within the spread anyway (``Bus.waited``): waiting for the pace first would
    add up to FIRST_PACE_WAIT to that, for nothing. Found by a review."""
    import asyncio

    bus = _Crowd()
    bus.waited = True
    mgr = ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                         bind_host="127.0.0.1", trusted_keys=[])
    mgr.attach(bus)  # type: ignore[arg-type]
    mgr.desired.fleet_nodes = 20_000  # as restored from the state file
    await asyncio.wait_for(mgr.desired._before_first_watch(), 0.5)
    assert bus.crowded is False


async def test_a_small_fleets_agent_does_not_wait_and_no_pace_holds_it_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A small fleet: no wait at all, also as its state file remembers it (any fleet of 1,000
    or fewer is remembered as 1,000, a spread of 2 s: a review found every restarted agent of
    a 3-node fleet waiting for the pace, 3 s without a leader). A large one with no leader to
    pace it: the wait ends after FIRST_PACE_WAIT and the watch starts as it did before."""
    import asyncio
    import time

    import agent.manager.desired as desired_mod

    small = _Crowd()
    mgr = ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                         bind_host="127.0.0.1", trusted_keys=[])
    mgr.attach(small)  # type: ignore[arg-type]
    mgr.desired.fleet_nodes = 3
    mgr.desired.fleet_nodes = mgr.desired.remembered_size()  # as restored from the state file
    assert mgr.desired.fleet_nodes == 1000
    await asyncio.wait_for(mgr.desired._before_first_watch(), 0.5)
    assert small.crowded is False
    monkeypatch.setattr(desired_mod, "FIRST_PACE_WAIT", 0.2)
    alone = _Crowd()
    mgr = ServiceManager(fleet=FLEET, node=NODE, data_dir=tmp_path,
                         bind_host="127.0.0.1", trusted_keys=[])
    mgr.attach(alone)  # type: ignore[arg-type]
    mgr.desired.fleet_nodes = 20_000
    began = time.monotonic()
    await asyncio.wait_for(mgr.desired._before_first_watch(), 5)
    assert time.monotonic() - began >= 0.2 and alone.crowded is False
