"""The rollout history against a real broker, a real coordinator process and real agents:
retention reduces old records to summaries (``status`` says so, ``rollback`` still finds the
version before), the events stream takes the configured limits, bad values are one line and
exit 2, and a fleet without indexes has them rebuilt by a restarted coordinator, which resumes
the rollout it was driving."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from nats.js.errors import NoKeysError

from coordinator.cli.base import Ctx
from coordinator.cli.client import call
from coordinator.dev.broker import Broker
from coordinator.dev.devfleet import Child, reap_leftovers
from coordinator.runtime.keyfile import coordinator_seed
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.errors import NotReachable
from protocol.history import ServiceIndex
from protocol.messages import KeyRequest, ReleaseRef, RolloutRecord, RolloutSpec
from protocol.signing import public_key
from tests.integration.procs import (
    fleetwave,
    hello_bundle,
    nodes_json,
    online,
    read_text,
    reaping,
    spawn_agent,
    spawn_coordinator,
    wait_until,
)

SUBNET = "127.0.68"  # this file's loopback addresses
HOSTS = (f"{SUBNET}.1", f"{SUBNET}.2")
NODES = ["node-1", "node-2"]


def coordinator(url: str, base: Path, *flags: str) -> Child:
    return spawn_coordinator(url, base, extra=["coordinator", "--key-file",
                                               str(base / "coordinator.seed"), *flags])


def agents(url: str, base: Path, *, trusted: bool = True) -> list[Child]:
    """Two agents on this file's addresses; ``trusted``: they accept the coordinator's key
    (else they refuse every desired state, and a rollout waits in its first wave)."""
    pub = public_key(coordinator_seed(base / "coordinator.seed"))
    return [spawn_agent(url, node, base, labels={"zone": "a"},
                        extra=["--bind-host", host, *(["--trust-key", pub] if trusted else [])])
            for node, host in zip(NODES, HOSTS, strict=True)]


async def up(url: str) -> None:
    async def key() -> object:
        try:
            return await call(Ctx(url, "default"), "key", KeyRequest())
        except NotReachable:
            return None
    await wait_until(key, lambda r: r is not None, timeout=30, what="the coordinator's API")


async def status(url: str, *args: str) -> dict[str, object]:
    code, out, err = await fleetwave("status", *args, "-o", "json", nats_url=url)
    assert code == 0, err
    st: dict[str, object] = json.loads(out)
    return st


async def test_bad_retention_flags_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """Each bad value names its flag, in one line, before anything connects."""
    for args, flag in ((["--keep-rollouts", "-1"], "--keep-rollouts"),
                       (["--keep-rollouts", "5000"], "--keep-rollouts"),
                       (["--events-max-age", "5"], "--events-max-age"),
                       (["--events-max-age", "1m"], "--events-max-age"),
                       (["--events-max-bytes", "lots"], "--events-max-bytes"),
                       (["--events-max-bytes", "1KB"], "--events-max-bytes")):
        code, out, err = await fleetwave("coordinator", "--key-file",
                                         str(tmp_path / "k.seed"), *args,
                                         nats_url="nats://127.0.68.1:1")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and flag in lines[0], (args, err)
        assert "Traceback" not in err and out == ""
    assert not (tmp_path / "k.seed").exists()


async def test_an_events_budget_the_server_cannot_hold_is_one_line_and_exit_2(
        broker: Broker, tmp_path: Path) -> None:
    """--events-max-bytes past what JetStream can reserve: the coordinator stops at start with
    one line saying what and what to do, instead of retrying for ever."""
    code, out, err = await fleetwave("coordinator", "--key-file", str(tmp_path / "seed"),
                                     "--events-max-bytes", "1PiB", nats_url=broker.url,
                                     timeout=60)
    assert code == 2, (code, out, err)
    refusals = [ln for ln in err.splitlines() if ln.startswith("fleetwave: ")]
    assert len(refusals) == 1 and "--events-max-bytes" in refusals[0], err
    assert "max_file_store" in refusals[0] and "Traceback" not in err


async def test_retention_reduces_old_rollouts_and_rollback_still_works(
        broker: Broker, tmp_path: Path) -> None:
    """--keep-rollouts 0: every finished rollout is reduced to its summary once its events are
    stored; ``status`` of one says "summarised", ``rollouts`` still lists them all, and
    ``rollback`` deploys the version before the last success with that rollout's settings. The
    events stream carries the configured limits."""
    url = broker.url
    coord = coordinator(url, tmp_path, "--keep-rollouts", "0", "--events-max-age", "48h",
                        "--events-max-bytes", "64MiB")
    async with contextlib.AsyncExitStack() as stack:
        # Last: services and routers outlive their agents by design.
        stack.push_async_callback(asyncio.to_thread, reap_leftovers, tmp_path, exclude=set())
        await stack.enter_async_context(reaping(coord))
        await up(url)
        await stack.enter_async_context(reaping(*agents(url, tmp_path)))
        await wait_until(lambda: nodes_json(url), lambda rows: online(rows, NODES), timeout=30,
                         what="the agents online")
        for v in ("1.0.0", "2.0.0"):
            code, _, err = await fleetwave("release", "push", str(hello_bundle(v)), nats_url=url)
            assert code == 0, err
        ids = []
        for v in ("1.0.0", "2.0.0"):
            code, out, err = await fleetwave("deploy", "hello", v, "--batch", "100%", "--bake",
                                             "0s", "--max-unavailable", "100%", nats_url=url,
                                             timeout=90)
            assert code == 0, (out, err)
            ids.append((await status(url))["id"])
        first, second = ids
        reduced = await wait_until(lambda: status(url, second), lambda st: bool(
            st.get("summarised")), timeout=30, what="the last rollout reduced")
        assert reduced["state"] == "succeeded" and reduced["version"] == "2.0.0"
        assert reduced["from_version"] == "1.0.0" and reduced["waves"] == []
        code, out, _ = await fleetwave("status", str(first), nats_url=url)
        assert code == 0 and "summarised:" in out and "hello (nothing) -> 1.0.0" in out
        code, out, _ = await fleetwave("rollouts", "-o", "json", nats_url=url)
        rows = json.loads(out)
        assert [r["id"] for r in rows] == [second, first]
        assert rows[0]["state"] == "succeeded" and rows[0]["nodes"] == 2

        # The last success is summarised: its spec is what rollback reuses.
        code, out, err = await fleetwave("rollback", "hello", nats_url=url, timeout=90)
        assert code == 0, (out, err)
        back = await status(url)
        assert back["version"] == "1.0.0" and back["from_version"] == "2.0.0"
        assert back["id"] not in ids

        bus = await Bus.connect(url, "default")
        try:
            info = await bus.js.stream_info(subjects.events_stream("default"))
            assert info.config.max_age == 48 * 3600.0
            assert info.config.max_bytes == 64 * 2**20
            # A reduced rollout keeps no older revision of its record.
            kv = await bus._bucket(subjects.rollouts_bucket("default"))

            async def revisions() -> int:
                # nats-py's history watch may end before its entries arrive (its #842:
                # NoKeysError for a key that has one): look again until it sees them.
                try:
                    return len(await kv.history(str(first)))
                except NoKeysError:
                    return 0

            await wait_until(revisions, lambda n: n == 1, timeout=10,
                             what="the reduced record's one revision")
        finally:
            await bus.close()


def old_record(i: int) -> RolloutRecord:
    """A finished rollout as a coordinator from before the indexes wrote it."""
    release = ReleaseRef(service="hello", version=f"0.{i}.0", digest="sha256:x")
    return RolloutRecord(id=f"hello-20250101-00000{i}-abcd", created=1.7e9 + i,
                         finished=1.7e9 + i + 1, state="succeeded", release=release,
                         spec=RolloutSpec(service="hello", version=release.version))


async def test_missing_indexes_are_rebuilt_and_a_killed_rollout_resumes(
        broker: Broker, tmp_path: Path) -> None:
    """A coordinator killed mid-rollout, on a fleet whose indexes are gone and which holds
    older records (as a previous version left them): the restarted one rebuilds the indexes
    once (logged), keeps the newest whole and reduces the rest, answers ``status`` and
    ``rollouts`` from them, and drives the rollout it was driving."""
    url = broker.url
    coord = coordinator(url, tmp_path, "--keep-rollouts", "2")
    async with contextlib.AsyncExitStack() as stack:
        # Last: services and routers outlive their agents by design.
        stack.push_async_callback(asyncio.to_thread, reap_leftovers, tmp_path, exclude=set())
        await stack.enter_async_context(reaping(coord))
        await up(url)
        # Untrusting agents: the rollout stays in its first wave until we look.
        await stack.enter_async_context(reaping(*agents(url, tmp_path, trusted=False)))
        await wait_until(lambda: nodes_json(url), lambda rows: online(rows, NODES), timeout=30,
                         what="the agents online")
        code, _, err = await fleetwave("release", "push", str(hello_bundle("1.0.0")),
                                       nats_url=url)
        assert code == 0, err
        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--detach", "-o", "json",
                                         "--progress-deadline", "10m", nats_url=url)
        assert code == 0, err
        rid = json.loads(out)["id"]
        await coord.kill()

        bus = await Bus.connect(url, "default")
        try:
            bucket = subjects.rollouts_bucket("default")
            for i in range(3):
                await bus.kv_put(bucket, old_record(i).id, encode(old_record(i)))
            await bus.kv_delete(bucket, subjects.index_key("hello"))
            await bus.kv_delete(bucket, subjects.LATEST_KEY)
            await coord.start()
            st = await wait_until(lambda: status(url), lambda st: st.get("id") == rid,
                                  timeout=30, what="status from the rebuilt index")
            assert st["state"] == "running"  # a standby's answer, from a scan, or the leader's
            entry = await wait_until(lambda: bus.kv_get(bucket, subjects.index_key("hello")),
                                     lambda e: e is not None, timeout=30,
                                     what="the leader to rebuild the index")
            assert entry is not None and entry.value is not None
            index = decode(ServiceIndex, entry.value)
            assert [s.id for s in index.rollouts] == [rid] + [old_record(i).id for i in (2, 1, 0)]
            assert [s.whole for s in index.rollouts] == [True, True, False, False]
        finally:
            await bus.close()
        log = await read_text(tmp_path / "logs" / "coordinator.log")
        assert "rebuilding them from 4 records" in log
        old = await status(url, old_record(0).id)
        assert old["summarised"] is True and old["version"] == "0.0.0"
        code, out, _ = await fleetwave("rollouts", "--service", "hello", "-o", "json",
                                       nats_url=url)
        assert [r["id"] for r in json.loads(out)] == index_ids(rid)
        # Resumed: it takes requests (pause, resume) from the restarted coordinator.
        await wait_until(lambda: fleetwave("pause", rid, nats_url=url), lambda r: r[0] == 0,
                         timeout=30, what="the restarted coordinator to drive it")
        assert (await status(url, rid))["state"] == "paused"
        code, _, err = await fleetwave("abort", rid, nats_url=url)
        assert code == 0, err


def index_ids(rid: str) -> list[str]:
    return [rid] + [old_record(i).id for i in (2, 1, 0)]
