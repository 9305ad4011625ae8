"""agent.manager.shell: what the agent keeps of the releases it fetched (``_fetch``, ``_prune``)
and of the fetches that failed."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from agent.manager.service import Service, settled
from agent.manager.shell import ServiceManager
from agent.reconcile import FetchError
from protocol.messages import DesiredState, ReleaseRef
from tests.unit.agent.host.test_releases import FakeStore, bundle, publish


def manager(store: FakeStore, data_dir: Path) -> ServiceManager:
    mgr = ServiceManager(fleet="test", node="n1", data_dir=data_dir,
                         bind_host="127.0.0.1", trusted_keys=[])
    mgr.attach(store)  # type: ignore[arg-type]
    return mgr


async def test_a_release_pruned_from_the_cache_is_fetched_again(tmp_path: Path) -> None:
    """Seven releases fetched, none running or wanted: the cache keeps its five most recent, and
    the agent forgets the two it deleted, so that a rollback to one fetches it again. A review
    found the agent still holding them: the slot started in a directory that no longer
    existed, and failed until the agent restarted."""
    store = FakeStore()
    mgr = manager(store, tmp_path / "agent")
    svc = mgr.services["hello"] = Service(name="hello")
    refs = [publish(store, bundle(tmp_path, f"1.0.{i}"), f"1.0.{i}") for i in range(7)]
    for ref in refs:
        await mgr._fetch(svc, ref)
    assert set(svc.releases) == {r.digest for r in refs}
    mgr._prune()
    assert set(svc.releases) == {r.digest for r in refs[2:]}
    assert all(rel.path.is_dir() for rel in svc.releases.values())


async def test_a_cached_bundle_is_refused_for_another_version(tmp_path: Path) -> None:
    """A bundle already in the cache (fetched before the agent's restart) is checked against
    the release its desired state names, as a fresh fetch is: the same bytes named as another
    version (the release index is the pusher's to write) are refused, in one line."""
    store = FakeStore()
    good = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    before = manager(store, tmp_path / "agent")
    svc = before.services["hello"] = Service(name="hello")
    await before._fetch(svc, good)
    assert good.digest in svc.releases
    after = manager(store, tmp_path / "agent")  # the agent restarted: its cache is warm
    svc = after.services["hello"] = Service(name="hello")
    forged = ReleaseRef(service="hello", version="9.9.9", digest=good.digest, size=good.size)
    await after._fetch(svc, forged)
    assert forged.digest not in svc.releases
    reason = svc.fetch_errors[forged.digest].reason
    assert reason == "release hello 9.9.9: the bundle's manifest says hello 1.0.0; refused"
    assert store.gets == 1  # from the cache, not fetched again


async def test_a_fetch_error_of_a_release_no_longer_desired_lets_the_loop_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rolled back to a state that no longer names the release whose fetch failed: the error is
    forgotten and the service settles, so the loop waits ``idle_tick`` between passes (a review
    found it passing every ``tick`` for the agent's life); an error of a release still named is
    kept (its retry waits on it)."""
    import agent.manager.shell as shell

    mgr = ServiceManager(fleet="test", node="n1", data_dir=tmp_path,
                         bind_host="127.0.0.1", trusted_keys=[], tick=0.01, idle_tick=30.0)
    svc = mgr.services["hello"] = Service(name="hello")
    svc.desired = DesiredState(fleet="test", node="n1", service="hello", generation=3)
    svc.fetch_errors["sha256:v2"] = FetchError("release hello 2.0 is not stored", 0.0)
    passes = 0
    real = shell.reconcile

    def counted(*args: Any) -> Any:
        nonlocal passes
        passes += 1
        return real(*args)

    monkeypatch.setattr(shell, "reconcile", counted)
    loop = asyncio.create_task(mgr._reconcile_loop())
    await asyncio.sleep(0.5)  # 50 ticks: a pass each while unsettled
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop
    assert passes == 1 and not svc.fetch_errors and settled(svc.view())

    wanted = ReleaseRef(service="hello", version="1.0", digest="sha256:v1")
    svc.desired = DesiredState(fleet="test", node="n1", service="hello", generation=4,
                               slots={"a": wanted})
    svc.fetch_errors = {d: FetchError("not stored", 0.0) for d in ("sha256:v1", "sha256:v2")}
    svc.forget_unwanted_fetch_errors()
    assert set(svc.fetch_errors) == {"sha256:v1"}
