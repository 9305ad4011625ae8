"""agent.manager.shell: the manager's local part runs without a bus (a restarted agent serves
while the broker is away); its bus part starts once the bus is attached and the state file is
restored."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.host.state import AgentState, ServiceRecord, load_state, save_state
from agent.manager.service import Service
from agent.manager.shell import ServiceManager
from protocol.messages import DesiredState, ReleaseRef
from protocol.signing import generate_seed, public_key, sign
from tests.unit.agent.host.test_releases import FakeStore, bundle, publish

FLEET, NODE = "test", "n1"  # FakeStore's object store is fleet "test"'s


def _manager(data_dir: Path, trusted: list[str] | None = None) -> ServiceManager:
    return ServiceManager(fleet=FLEET, node=NODE, data_dir=data_dir, bind_host="127.0.0.1",
                          trusted_keys=trusted or [], tick=0.01, idle_tick=0.05)


def _remember(mgr: ServiceManager, seed: bytes, ref: ReleaseRef) -> None:
    """A state file that remembers generation 1 of hello, slot a on ``ref``."""
    env = sign(seed, DesiredState(fleet=FLEET, node=NODE, service="hello", generation=1,
                                  slots={"a": ref}))
    save_state(mgr.restorer.state_path, AgentState(node=NODE, fleet=FLEET, services={
        "hello": ServiceRecord(service="hello", envelope=env, generation=1),
    }))


async def _until(ok: Any, what: str) -> None:
    """Poll ``ok`` for up to 5 s (the loop's tick is 10 ms)."""
    for _ in range(500):
        if ok():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_local_part_converges_from_the_state_file_without_a_bus(
    tmp_path: Path,
) -> None:
    """Never attached: the remembered desired state is restored and reconciled; a release not
    in the cache fails to fetch as a bus failure (transient: retried, the generation not
    failed), its event and the observed state wait for the bus; a stop saves the state."""
    seed = generate_seed()
    ref = ReleaseRef(service="hello", version="1.0.0", digest="sha256:" + "ab" * 32, size=10)
    mgr = _manager(tmp_path, [public_key(seed)])
    _remember(mgr, seed, ref)
    running = asyncio.create_task(mgr.run_local())
    try:
        await _until(lambda: "hello" in mgr.services
                     and ref.digest in mgr.services["hello"].fetch_errors, "a fetch attempted")
        svc = mgr.services["hello"]
        error = svc.fetch_errors[ref.digest]
        assert error.transient and "not connected to NATS yet" in error.reason
        await _until(lambda: svc.pending_observed is not None, "an observed state queued")
        assert svc.pending_observed is not None and svc.pending_observed.generation == 1
        assert svc.pending_observed.phase != "failed"
        kinds = {e.kind for e in mgr.events.publisher.pending()}
        assert "release.failed" in kinds
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert load_state(mgr.restorer.state_path).services["hello"].generation == 1


async def test_a_cached_release_is_at_hand_before_the_bus(tmp_path: Path) -> None:
    """A release fetched by the agent's previous life is taken from the cache without a bus;
    one that is not there waits for it, and is fetched once the bus is attached."""
    store = FakeStore()
    cached = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    missing = publish(store, bundle(tmp_path, "2.0.0"), "2.0.0")
    before = _manager(tmp_path / "agent")
    before.attach(store)  # type: ignore[arg-type]
    svc = before.services["hello"] = Service(name="hello")
    await before._fetch(svc, cached)
    assert store.gets == 1
    after = _manager(tmp_path / "agent")  # restarted, the broker away
    svc = after.services["hello"] = Service(name="hello")
    await after._fetch(svc, cached)
    await after._fetch(svc, missing)
    assert cached.digest in svc.releases and missing.digest not in svc.releases
    assert svc.fetch_errors[missing.digest].transient and store.gets == 1
    after.wake.clear()
    after.attach(store)  # type: ignore[arg-type]
    assert not svc.fetch_errors and after.wake.is_set()  # tried again at once
    await after._fetch(svc, missing)
    assert missing.digest in svc.releases and store.gets == 2


async def test_the_first_pass_after_the_attach_reports_again(tmp_path: Path) -> None:
    """A state queued before the bus was attached is queued again after it, at once: the
    coordinator hears the node's services as soon as it can."""
    mgr = _manager(tmp_path)
    svc = mgr.services["hello"] = Service(name="hello")
    svc.desired = DesiredState(fleet=FLEET, node=NODE, service="hello", generation=2)
    mgr.observed.observe(svc)
    first, svc.pending_observed = svc.pending_observed, None
    assert first is not None
    mgr.observed.observe(svc)
    assert svc.pending_observed is None  # unchanged: nothing new to say
    mgr.attach(_Bus())  # type: ignore[arg-type]
    mgr.observed.observe(svc)
    assert svc.pending_observed is not None and svc.pending_observed.generation == 2


class _Bus:
    """What the bus part asks of the bus: its watch is recorded and stays open."""

    reconnects = 0
    waited = False
    crowded = False

    def __init__(self) -> None:
        self.watches: list[str] = []

    async def watch(self, bucket: str, pattern: str, **_: Any) -> AsyncIterator[None]:
        self.watches.append(pattern)
        await asyncio.Event().wait()  # cancelled with the bus part
        yield None

    async def kv_entries(self, bucket: str, pattern: str) -> list[object]:
        return []

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        pass

    async def js_publish_events(self, messages: Any, *, timeout: float = 0.0) -> list[None]:
        return [None for _ in messages]

    async def subscribe(self, subject: str, cb: Any, queue: str = "") -> str:
        return subject

    async def unsubscribe(self, sub: str) -> None:
        pass


async def test_the_bus_part_watches_only_once_the_state_file_is_restored(
    tmp_path: Path,
) -> None:
    """Connected before the restore is done, the bus part waits for it: a desired state
    accepted earlier would be overwritten by the one the state file remembers."""
    mgr = _manager(tmp_path)
    bus = _Bus()
    online = asyncio.create_task(mgr.run_bus(bus))  # type: ignore[arg-type]
    local: asyncio.Task[None] | None = None
    try:
        await asyncio.sleep(0.05)
        assert mgr.bus is bus and bus.watches == []
        local = asyncio.create_task(mgr.run_local())
        await _until(lambda: bus.watches == [f"{NODE}.*"], "the watch started")
    finally:
        for task in (online, local):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


@pytest.mark.parametrize("stopping", [True, False])
async def test_a_stopping_agent_starts_nothing(tmp_path: Path, stopping: bool) -> None:
    """The agent's stop is set: the state file is restored and the passes run (the release
    the desired state wants is taken from the cache), but the slot is not started, in the
    pass after that nor later (nor would a router be): a stop that signals the agent and its
    services at once must not see it start them again. (Not stopping, the same agent starts
    it.)"""
    seed = generate_seed()
    store = FakeStore()
    ref = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    before = _manager(tmp_path / "agent", [public_key(seed)])
    before.attach(store)  # type: ignore[arg-type]
    await before._fetch(Service(name="hello"), ref)  # in the cache: at hand without a bus
    mgr = _manager(tmp_path / "agent", [public_key(seed)])
    _remember(mgr, seed, ref)
    passes = []
    observe = mgr.observed.observe
    mgr.observed.observe = lambda svc: (passes.append(ref.digest in svc.releases),  # type: ignore[method-assign]
                                        observe(svc))[1]
    stop = asyncio.Event()
    if stopping:
        stop.set()
    running = asyncio.create_task(mgr.run_local(stop))
    try:
        # a pass that began with the release at hand, then the next: a Start was asked for
        await _until(lambda: passes.count(True) >= 2, "two passes with the release")
        assert list(mgr.services["hello"].runners) == ([] if stopping else ["a"])
    finally:
        stop.set()  # no restart of what is stopped below
        for runner in mgr.services["hello"].runners.values():
            await runner.stop(2.0)  # the slot started when not stopping, and reaped
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
