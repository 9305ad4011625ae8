"""agent.manager.prefetch: which notices an agent fetches ahead, when, and what a deploy of a
release fetched ahead costs (nothing more)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.errors import ReleaseError
from agent.manager import prefetch
from agent.manager.prefetch import Prefetcher, prefetch_spread
from agent.manager.service import Service, Services
from agent.manager.shell import ServiceManager
from protocol.codec import encode
from protocol.messages import DesiredState, ReleaseNotice, ReleaseRef
from tests.unit.agent.host.test_releases import FakeStore, bundle, publish

LIMIT = 10**7  # the agent's bundle limit, in these tests


def ref(version: str, size: int = 1000) -> ReleaseRef:
    return ReleaseRef(service="hello", version=version,
                      digest="sha256:" + version.replace(".", "").ljust(64, "0"), size=size)


def notice(r: ReleaseRef) -> bytes:
    return encode(ReleaseNotice(release=r))


def running(name: str = "hello", *, slots: bool = True) -> Service:
    """A service this node runs (or, without slots, one removed from it)."""
    svc = Service(name=name)
    svc.desired = DesiredState(
        fleet="test", node="n1", service=name, generation=1,
        slots={"a": ref("1.0.0")} if slots else {}, weights={"a": 100} if slots else {})
    return svc


class Fetches:
    """The manager's fetch, recorded; ``fail`` raises as a failed fetch does."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.fail = False
        self.running = 0
        self.most = 0
        self.calls = 0
        self.each = asyncio.Event()  # a call ended

    async def __call__(self, svc: Service, r: ReleaseRef) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0)  # a fetch suspends: another could start meanwhile
            if self.fail:
                raise ReleaseError(f"release {r.service} {r.version}: cannot fetch it: gone")
            self.done.append(r.version)
        finally:
            self.running -= 1
            self.calls += 1
            self.each.set()

    async def ended(self, n: int) -> None:
        """Until ``n`` calls have ended (5 s at most)."""
        async with asyncio.timeout(5):
            while self.calls < n:
                self.each.clear()
                await self.each.wait()


def prefetcher(services: Services, fetch: Fetches, nodes: int = 0) -> Prefetcher:
    return Prefetcher("test", services, fetch, lambda: nodes, max_bytes=LIMIT)


@pytest.mark.parametrize(("services", "data", "why"), [
    ({}, notice(ref("2.0.0")), "a service this node never ran"),
    ({"hello": running(slots=False)}, notice(ref("2.0.0")), "removed from this node"),
    ({"hello": Service(name="hello")}, notice(ref("2.0.0")), "no desired state"),
    ({"hello": running()}, notice(ref("2.0.0", size=LIMIT + 1)), "above the bundle limit"),
    ({"hello": running()}, b'{"release": 3}', "malformed"),
    ({"hello": running()}, b"\xff", "not JSON"),
])
async def test_a_notice_not_for_this_node_is_not_wanted(
    services: Services, data: bytes, why: str,
) -> None:
    p = prefetcher(services, Fetches())
    p.heard(data)
    assert p.wanted == {}, why


async def test_a_release_at_hand_already_is_not_fetched_again(tmp_path: Path) -> None:
    svc = running()
    svc.releases[ref("2.0.0").digest] = object()  # type: ignore[assignment]
    p = prefetcher({"hello": svc}, Fetches())
    p.heard(notice(ref("2.0.0")))
    assert p.wanted == {}


async def test_the_newest_notice_of_a_service_replaces_one_not_fetched_yet() -> None:
    fetch = Fetches()
    p = prefetcher({"hello": running(), "other": running("other")}, fetch)
    for v in ("2.0.0", "2.1.0"):
        p.heard(notice(ref(v)))
    p.heard(notice(ReleaseRef(service="other", version="9.0", digest="sha256:" + "9" * 64)))
    assert {name: r.version for name, (r, _) in p.wanted.items()} == {"hello": "2.1.0",
                                                                      "other": "9.0"}
    worker = asyncio.create_task(p.work())
    try:
        await fetch.ended(2)
    finally:
        worker.cancel()
    assert sorted(fetch.done) == ["2.1.0", "9.0"] and fetch.most == 1  # one at a time


async def test_each_node_fetches_within_the_fleets_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The moment is drawn within ``prefetch_spread`` of the fleet's size (the leader's pace)
    and the bundle's; it comes later than a notice heard after it, which goes first."""
    drawn: list[float] = []

    def uniform(low: float, high: float) -> float:
        drawn.append(high)
        return high if len(drawn) == 1 else 0.0

    monkeypatch.setattr(prefetch.random, "uniform", uniform)
    fetch = Fetches()
    p = prefetcher({"hello": running(), "other": running("other")}, fetch, nodes=400)
    p.heard(notice(ref("2.0.0", size=1_000_000)))  # 400 x 1 MB at 50 MB/s: within 8 s
    assert drawn == [pytest.approx(8.0)]
    worker = asyncio.create_task(p.work())
    try:
        await asyncio.sleep(0)  # the worker runs up to its wait for the first one's moment
        assert fetch.done == [] and fetch.running == 0  # its moment has not come
        p.heard(notice(ReleaseRef(service="other", version="9.0", digest="sha256:" + "9" * 64)))
        await fetch.ended(1)
        assert fetch.done == ["9.0"] and list(p.wanted) == ["hello"]
    finally:
        worker.cancel()


def test_the_spread_keeps_the_fleets_downloads_within_a_rate() -> None:
    assert prefetch_spread(0, 10**9) == 0.0  # no pace heard yet: at once
    assert prefetch_spread(10, 4000) == pytest.approx(10 * 64 * 1024 / 50e6)  # 13 ms
    assert prefetch_spread(50_000, 100_000) == pytest.approx(100.0)
    assert prefetch_spread(50_000, 10**9) == 600.0  # at most


async def test_a_failed_prefetch_is_logged_and_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    fetch = Fetches()
    fetch.fail = True
    p = prefetcher({"hello": running()}, fetch)
    p.heard(notice(ref("2.0.0")))
    worker = asyncio.create_task(p.work())
    try:
        await fetch.ended(1)
    finally:
        worker.cancel()
    assert p.wanted == {} and p.fetched == 0
    assert ("cannot fetch hello 2.0.0 ahead of its deploy (the deploy fetches it): release "
            "hello 2.0.0: cannot fetch it: gone") in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records if "ahead" in r.message)


async def test_a_deploy_of_a_release_fetched_ahead_downloads_nothing(tmp_path: Path) -> None:
    """The manager's prefetch puts the release in the cache and among the service's releases;
    the deploy's fetch of it then gets nothing from the store (one get in all)."""
    store = FakeStore()
    mgr = ServiceManager(fleet="test", node="n1", data_dir=tmp_path, bind_host="127.0.0.1",
                         trusted_keys=[])
    mgr.attach(store)  # type: ignore[arg-type]
    svc = mgr.services["hello"] = running()
    new = publish(store, bundle(tmp_path, "2.0.0"), "2.0.0")
    await mgr._prefetch(svc, new)
    assert new.digest in svc.releases and store.gets == 1
    svc.releases.clear()  # as after the agent's restart: the cache still has it
    await mgr._fetch(svc, new)
    assert new.digest in svc.releases and store.gets == 1


async def test_releases_pushed_and_never_deployed_keep_the_rollbacks_target(
        tmp_path: Path) -> None:
    """Five releases pushed (each fetched ahead, none deployed) do not push the release of the
    previous deploy, a rollback's target, out of the cache: what is kept is the releases last
    deployed, the one running, and the newest fetched ahead (until a newer one replaces it)."""
    store = FakeStore()
    mgr = ServiceManager(fleet="test", node="n1", data_dir=tmp_path, bind_host="127.0.0.1",
                         trusted_keys=[])
    mgr.attach(store)  # type: ignore[arg-type]
    svc = mgr.services["hello"] = Service(name="hello")
    mgr.cache.keep = 2
    before, now = (publish(store, bundle(tmp_path, v), v) for v in ("1.0.0", "2.0.0"))
    for r in (before, now):  # deployed, one after the other
        await mgr._fetch(svc, r)
    svc.desired = DesiredState(fleet="test", node="n1", service="hello", generation=2,
                               slots={"a": now}, weights={"a": 100})
    pushed = [publish(store, bundle(tmp_path, f"3.0.{i}"), f"3.0.{i}") for i in range(5)]
    for r in pushed:
        await mgr._prefetch(svc, r)
    mgr._pruned_at = float("-inf")
    mgr._prune()
    assert mgr.cache.path_for(before) is not None  # the rollback's target
    assert mgr.cache.path_for(now) is not None and mgr.cache.path_for(pushed[-1]) is not None
    assert [r.version for r in pushed if mgr.cache.path_for(r) is not None] == ["3.0.4"]
    assert set(svc.releases) == {before.digest, now.digest, pushed[-1].digest}


def test_with_prefetch_off_the_manager_has_no_prefetcher(tmp_path: Path) -> None:
    mgr = ServiceManager(fleet="test", node="n1", data_dir=tmp_path, bind_host="127.0.0.1",
                         trusted_keys=[], prefetch=False)
    assert mgr.prefetcher is None
