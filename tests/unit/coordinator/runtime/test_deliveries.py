"""Consumers delivering elsewhere than an inbox (``coordinator.runtime.deliveries``): which
subjects are inboxes, and the files removed from a stopped server's store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from coordinator.runtime.deliveries import foreign, guard, made_foreign, sweep_loop, sweep_store
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


STREAMS = frozenset({"FW_default_EVENTS", "OBJ_fw-default-releases"})


def _audit(deliver: str, *, subject: str = "$JS.API.CONSUMER.CREATE.FW_default_EVENTS.x1",
           stream: str = "FW_default_EVENTS", client: dict[str, object] | None = None,
           response: str | None = None) -> bytes:
    """JetStream's API audit advisory of a consumer create, in the shape nats-server 2.15
    sends it (captured from a secure dev fleet: an operator's create, seen by the FLEET
    account)."""
    made = {"type": "io.nats.jetstream.api.v1.consumer_create_response",
            "stream_name": stream, "name": "x1", "created": "2026-12-07T08:54:32.79Z",
            "config": {"durable_name": "x1", "name": "x1", "deliver_policy": "all",
                       "ack_policy": "none", "deliver_subject": deliver, "num_replicas": 0}}
    return json.dumps({
        "type": "io.nats.jetstream.advisory.v1.api_audit", "id": "1Fyyoq3BJr0d21M9oqYv9s",
        "timestamp": "2026-12-07T08:54:32.800211736Z", "server": "fleetwave",
        "client": client if client is not None else {"acc": "OPS", "svc": "FLEET",
                                                     "rtt": 2539201, "server": "fleetwave"},
        "subject": subject, "request": json.dumps({"stream_name": stream}),
        "response": response if response is not None else json.dumps(made)}).encode()


def test_an_audited_foreign_consumer_is_found_with_whose_credentials_made_it() -> None:
    assert made_foreign(_audit("$KV.fw-default-lease.leader"), STREAMS) == (
        "FW_default_EVENTS", "x1", "$KV.fw-default-lease.leader",
        "an operator's credentials (account OPS)")
    durable = _audit("fw.default.pace", subject="$JS.API.CONSUMER.DURABLE.CREATE.OBJ_x.x1",
                     stream="OBJ_fw-default-releases", client={"acc": "NODES"})
    assert made_foreign(durable, STREAMS) == (
        "OBJ_fw-default-releases", "x1", "fw.default.pace", "a node's credentials (account NODES)")
    one = _audit("fw.default.pace", client={"acc": "$G", "user": "UABC", "name": "bob's cli"})
    assert made_foreign(one, STREAMS)[3] == (  # type: ignore[index]
        "the fleet's credentials (account $G, user UABC, connection \"bob's cli\")")


@pytest.mark.parametrize("audit", [
    pytest.param(_audit("_FWO.admin.q"), id="an-inbox"),
    pytest.param(_audit("_INBOX.abc"), id="nats-py-inbox"),
    pytest.param(_audit(""), id="a-pull-consumer"),
    pytest.param(_audit("fw.default.pace", stream="KV_other"), id="another-stream"),
    pytest.param(_audit("fw.default.pace", subject="$JS.API.STREAM.INFO.FW_default_EVENTS"),
                 id="another-call"),
    pytest.param(_audit("fw.default.pace", response=json.dumps(
        {"type": "io.nats.jetstream.api.v1.consumer_create_response",
         "error": {"code": 400, "err_code": 10013, "description": "consumer name in use"}})),
        id="a-refused-create"),
    pytest.param(_audit("fw.default.pace", response="not json"), id="a-response-not-json"),
    pytest.param(b"\x00 not an audit CONSUMER.CREATE.", id="not-json"),
    pytest.param(b'{"subject": 5, "response": "CONSUMER.CREATE."}', id="another-shape"),
])
def test_anything_else_audited_is_no_foreign_consumer(audit: bytes) -> None:
    assert made_foreign(audit, STREAMS) is None


async def test_the_guard_never_ends_the_leadership_it_runs_in(
        caplog: pytest.LogCaptureFixture) -> None:
    """A subscription refused (a bus error, or a bug) is said and tried again: the guard runs
    among the leader's tasks, the first of which to end ends the leadership."""
    failures: list[Exception] = [BusError("no answer"), RuntimeError("a bug")]
    subscribed = asyncio.Event()

    class Flaky(_Bus):
        async def subscribe(self, subject: str, cb: object, *, pending_bytes: int = 0) -> str:
            if failures:
                raise failures.pop(0)
            subscribed.set()
            return subject

        async def unsubscribe(self, sub: object) -> None:
            pass

    task = asyncio.ensure_future(guard(Flaky(), retry=0.01))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            await subscribed.wait()
        assert not task.done()
        assert "no answer" in caplog.text and "a bug" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
