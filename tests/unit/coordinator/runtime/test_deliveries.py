"""Consumers delivering elsewhere than an inbox (``coordinator.runtime.deliveries``): which
subjects are inboxes, and the files removed from a stopped server's store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from coordinator.runtime.deliveries import foreign, sweep_loop, sweep_store
from protocol.errors import BusError


@pytest.mark.parametrize("subject", ["_INBOX.abc.1", "_FWN.node-1.x", "_FWO.alice.y",
                                     "_INBOX_node-1.z", "_OPS_alice.w"])
def test_an_inbox_is_no_foreign_delivery(subject: str) -> None:
    assert not foreign(subject)


@pytest.mark.parametrize("subject", ["$KV.fw-f-lease.leader", "fw.f.evt.zz", "fw.f.pace",
                                     "$O.fw-f-releases.C.x", "_R_.abc", "x"])
def test_a_stream_subject_or_anything_else_is(subject: str) -> None:
    assert foreign(subject)


def _consumer(store: Path, account: str, stream: str, name: str, meta: bytes) -> Path:
    obs = store / "jetstream" / account / "streams" / stream / "obs" / name
    obs.mkdir(parents=True)
    (obs / "meta.inf").write_bytes(meta)
    (obs / "o.dat").write_bytes(b"state")
    return obs


def test_the_stores_foreign_consumers_go_and_nothing_else(tmp_path: Path) -> None:
    """A consumer delivering onto a stream's subject is removed (its directory) in either
    account; a node's watch, a pull consumer and an unreadable meta file stay."""
    def meta(subject: str | None) -> bytes:
        return json.dumps({"name": "c", **({"deliver_subject": subject} if subject else {})}
                          ).encode()
    evil = _consumer(tmp_path, "FLEET", "KV_fw-f-lease", "evil", meta("fw.f.evt.zz"))
    old = _consumer(tmp_path, "$G", "OBJ_fw-f-releases", "old", meta("$KV.fw-f-desired.n.s"))
    watch = _consumer(tmp_path, "FLEET", "KV_fw-f-desired", "w1", meta("_FWN.node-1.abc"))
    pull = _consumer(tmp_path, "FLEET", "fw-f-events", "notify", meta(None))
    odd = _consumer(tmp_path, "FLEET", "KV_fw-f-lease", "odd", b"\x00not json")
    assert sorted(sweep_store(tmp_path)) == sorted([evil, old])
    assert not evil.exists() and not old.exists()
    assert watch.is_dir() and pull.is_dir() and odd.is_dir()
    assert sweep_store(tmp_path) == []


def test_a_cluster_members_store_is_left_to_the_leader(tmp_path: Path) -> None:
    evil = _consumer(tmp_path, "FLEET", "KV_fw-f-lease", "evil",
                     json.dumps({"deliver_subject": "fw.f.evt.zz"}).encode())
    (tmp_path / "jetstream" / "$SYS" / "_js_").mkdir(parents=True)
    assert sweep_store(tmp_path) == [] and evil.is_dir()


def test_no_store_yet_is_nothing_to_do(tmp_path: Path) -> None:
    assert sweep_store(tmp_path / "new") == []


class _Bus:
    """What ``sweep`` reads of a Bus: the fleet's streams, their push consumers, deletes."""

    def __init__(self) -> None:
        self.reconnects = 0
        self.consumers = {"KV_lease": [("w1", "_INBOX.a"), ("evil", "fw.f.evt.zz")]}
        self.deleted: list[str] = []
        self.changed = asyncio.Event()

    def fleet_streams(self) -> list[str]:
        return ["KV_lease", "OBJ_releases"]

    async def push_consumers(self, stream: str) -> list[tuple[str, str]]:
        return [c for c in self.consumers.get(stream, []) if c[0] not in self.deleted]

    async def delete_consumer(self, stream: str, name: str) -> None:
        self.deleted.append(name)
        self.changed.set()

    async def until(self, deleted: list[str]) -> None:
        while self.deleted != deleted:
            self.changed.clear()
            await self.changed.wait()


async def test_the_leader_sweeps_at_once_and_after_each_reconnect() -> None:
    """At its start, then not until ``every``, but at once after a reconnect (a restarted
    server has just recovered its consumers)."""
    bus = _Bus()
    task = asyncio.ensure_future(sweep_loop(bus, every=3600))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            await bus.until(["evil"])
            bus.consumers["KV_lease"].append(("evil2", "$KV.fw-f-lease.leader"))
            bus.reconnects += 1
            await bus.until(["evil", "evil2"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failing_sweep_never_ends_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    """A sweep that raises (a bus error, or a bug) is said and tried again later: the loop
    runs inside the leadership, which it must never end."""
    bus = _Bus()
    failures = [BusError("no answer"), RuntimeError("a bug")]
    real = bus.push_consumers
    tried = asyncio.Event()

    async def flaky(stream: str) -> list[tuple[str, str]]:
        tried.set()
        if failures:
            raise failures.pop(0)
        return await real(stream)
    bus.push_consumers = flaky  # type: ignore[method-assign]
    task = asyncio.ensure_future(sweep_loop(bus, every=3600))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            for _ in range(2):  # the failing sweeps: at the start, then after a reconnect
                await tried.wait()
                tried.clear()
                bus.reconnects += 1  # a sweep at once, not after RETRY
            await bus.until(["evil"])
        assert not task.done()
        assert "no answer" in caplog.text and "a bug" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
