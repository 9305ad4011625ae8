"""The record split on a real server with the default max_payload (1 MB): a rollout of a few
thousand simulated nodes (whose record as one value would be ~5 MB) is stored as a head and pages
none of which reaches the limit, survives a coordinator killed mid-way (the next one resumes it
exactly: no node told two things under one generation, every node done once), and a deploy
whose head could not fit is refused in one line. Real nats-server, coordinator and agent
(``--simulate``) on 127.0.72.x."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.dev.broker import Broker
from coordinator.dev.devfleet import Child, python_module
from coordinator.dev.examples import assembled
from coordinator.releases import push_release
from coordinator.runtime.keyfile import coordinator_seed
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.errors import BusError
from protocol.history import RolloutPage, unpack_page
from protocol.messages import (
    ApiReply,
    DeployRequest,
    Event,
    NodesRequest,
    Pace,
    RolloutRecord,
    RolloutRequest,
    RolloutSpec,
)
from protocol.signing import public_key
from tests.integration.e2e_support import desired_history, desired_log, record_of
from tests.integration.procs import fleetwave, reaping, wait_until

N = 2000
SUBNET = "127.0.72"
FLEET = "default"


def coordinator(url: str, base: Path, key: Path, name: str = "coordinator",
                *flags: str) -> Child:
    return Child(name, python_module(
        "coordinator.daemon", "--nats", url, "--fleet", FLEET, "coordinator", "--key-file",
        str(key), *flags), base / "logs" / f"{name}.log")


async def api(bus: Bus, verb: str, request: Any, timeout: float = 30.0) -> Any:
    reply = decode(ApiReply, await bus.request(subjects.api(FLEET, "test", verb),
                                               encode(request), timeout=timeout))
    assert reply.ok, f"{verb}: {reply.error}"
    return reply.data


async def nodes(bus: Bus) -> list[dict[str, Any]]:
    """The coordinator's node rows; none while it is not up yet."""
    try:
        return await api(bus, "nodes", NodesRequest(), timeout=5)  # type: ignore[no-any-return]
    except BusError:
        return []


Sim = tuple[Broker, Bus, Child, Child, Path]


@contextlib.asynccontextmanager
async def simulated(tmp_path: Path, n: int, max_payload: str, subnet: str = SUBNET,
                    paces: list[Pace] | None = None) -> AsyncIterator[Sim]:
    """A broker taking messages of up to ``max_payload``, a coordinator, ``n`` simulated nodes
    (on ``subnet``.1) online, and the hello releases pushed; ``paces``: every pace the leader
    publishes is appended to it, from before the coordinator and the agent start."""
    broker = Broker(store_dir=tmp_path / "js", max_payload=max_payload)
    key = tmp_path / "coordinator.seed"
    trust = public_key(await asyncio.to_thread(coordinator_seed, key))
    agent = Child("sim", python_module(
        "agent.main", "--node-id", "sim", "--simulate", str(n), "--trust-key", trust,
        "--nats", broker.url, "--fleet", FLEET, "--data-dir", str(tmp_path / "sim"),
        "--bind-host", f"{subnet}.1", "--heartbeat-interval", "2"), tmp_path / "logs" / "sim.log")
    coord = coordinator(broker.url, tmp_path, key)
    await broker.start()
    try:
        bus = await Bus.connect(broker.url, FLEET, name="test-record-split")
        try:
            if paces is not None:
                heard = paces

                async def on_pace(_subject: str, data: bytes) -> None:
                    heard.append(decode(Pace, data))

                await bus.subscribe(subjects.pace(FLEET), on_pace)
            async with reaping(coord, agent):
                for v in ("1.0.0", "2.0.0"):
                    await push_release(bus, assembled(v))
                await wait_until(lambda: nodes(bus),
                                 lambda rows: sum(r["online"] for r in rows) == n, timeout=60,
                                 what=f"{n} simulated nodes online", interval=0.5)
                yield broker, bus, coord, agent, key
        finally:
            await bus.close()
    finally:
        await broker.stop()


def rolling(version: str, batch: str) -> RolloutSpec:
    return RolloutSpec(service="hello", version=version, batch=batch, max_unavailable=batch,
                       bake=0.0, progress_deadline=120.0)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Sim]:
    async with simulated(tmp_path, N, "1MB") as fleet:  # the server's own default
        assert fleet[1].max_payload == 1 << 20
        yield fleet


async def test_a_rollout_beyond_one_message_runs_and_resumes_exactly(
        sim: Sim, tmp_path: Path) -> None:
    broker, bus, coord, _agent, key = sim
    waves: list[Event] = []

    async def on_event(_subject: str, data: bytes) -> None:
        event = decode(Event, data)
        if event.kind == "wave.started":
            waves.append(event)

    await bus.subscribe(subjects.events(FLEET), on_event)
    data = await api(bus, "deploy", DeployRequest(spec=rolling("1.0.0", "10%")))
    rid = str(data["id"])
    await wait_until(lambda: asyncio.sleep(0, waves), lambda w: len(w) >= 3, timeout=60,
                     what="the third wave")
    coord.signal(signal.SIGKILL)  # mid-rollout, without a word
    await coord.wait(timeout=10)
    bucket = subjects.rollouts_bucket(FLEET)
    top = await bus.kv_get(bucket, rid)
    assert top is not None and top.value is not None
    head = decode(RolloutRecord, top.value)
    assert head.pages > 1 and head.node_count == N and head.nodes == {}
    whole = await record_of(bus, rid)
    assert len(whole.nodes) == N and head.state == "running"

    async with reaping(coordinator(broker.url, tmp_path, key)):
        async def state() -> str:
            try:
                return str((await api(bus, "status", RolloutRequest(id=rid), 5))["state"])
            except BusError:  # the new coordinator is not up yet
                return ""

        await wait_until(state, lambda s: s == "succeeded", timeout=90, what="the rollout's end")
        status = await api(bus, "status", RolloutRequest(id=rid))
    assert len(status["nodes"]) == N
    assert all(p["state"] == "done" for p in status["nodes"].values())
    assert sum(len(w["nodes"]) for w in status["waves"]) == N
    done = await record_of(bus, rid)
    assert done.state == "succeeded" and len(done.nodes) == N
    assert [w.nodes for w in done.waves] == [w.nodes for w in whole.waves]  # the plan kept
    # every page and the head fit one message of the server, far from it
    sizes = [len(e.value or b"") for e in await bus.kv_entries(bucket, f"{rid}.*")]
    assert len(sizes) == head.pages and max(sizes) < 1 << 20
    assert all(decode(RolloutPage, unpack_page(e.value or b"")).rollout == rid
               for e in await bus.kv_entries(bucket, f"{rid}.*"))
    # exactly: no node was told two things under one generation (the resumed coordinator
    # re-wrote what its predecessor intended, nothing else), and each got 1.0.0 once
    history = desired_history(await desired_log(broker.url, FLEET))
    assert len(history) == N
    assert all(gens == sorted(set(gens)) for gens in history.values())


async def test_a_deploy_whose_record_head_cannot_fit_is_refused_in_one_line(
        tmp_path: Path) -> None:
    """On a server taking 600 KB: 1,000 nodes in waves of 10 % are stored (their table, ~1 MB,
    in pages); one wave per node is refused, the head's wave list and the outbox's room alone
    passing what the server takes, in one line that names the fix, and nothing is written."""
    async with simulated(tmp_path, 1000, "600KB") as (broker, bus, *_):
        bucket = subjects.rollouts_bucket(FLEET)

        async def stored() -> set[str]:
            # The leader's fence marker is written when it takes the lease, which may come
            # after this test starts: it is the leader's, not the deploy's, so it is left out.
            return {e.key for e in await bus.kv_entries(bucket)} - {subjects.FENCE_KEY}

        before = await stored()
        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--batch", "1",
                                         "--detach", nats_url=broker.url)
        assert code == 2, (code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "(max_payload 600 KiB)" in lines[0], err
        assert "fewer, larger waves (--batch)" in lines[0] and "Traceback" not in err
        assert await stored() == before
        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--batch", "10%",
                                         "--max-unavailable", "10%", "--detach",
                                         nats_url=broker.url)
        assert code == 0, (code, out, err)
        top = await bus.kv_get(bucket, out.strip())
        assert top is not None and top.value is not None
        head = decode(RolloutRecord, top.value)
        assert head.pages > 1 and head.node_count == 1000
