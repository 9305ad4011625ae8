"""End to end: a dev fleet of 3 real agents running the example ``hello`` service behind their
routers (127.0.1.i:8080), rolled with the real CLI under steady load.

Prints (run with -s) the time of the rolling rollout and the time from the failing gate to the
last node serving the old version again; the lead tracks these figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.dev.devfleet import DevFleet
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import ObservedState
from tests.integration.e2e_support import desired_log
from tests.integration.procs import fleetwave, hello_bundle, wait_until

SUBNET = "127.0.1"  # the dev fleet's default: the routers listen on 127.0.1.i:8080
NODES = (1, 2, 3)
PORT = 8080
DEPLOY_TIMEOUT = 100.0


async def get(host: str, path: str = "/", timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    """One GET on a fresh connection: (status, JSON body or {})."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, PORT)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                         .encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    return status, doc if isinstance(doc, dict) else {}


async def versions() -> dict[str, str]:
    """What each node's router answers now ("" if it does not answer 200)."""
    out = {}
    for i in NODES:
        try:
            status, doc = await get(DevFleet.bind_host(i, SUBNET), timeout=2.0)
            out[f"node-{i}"] = str(doc.get("version", "")) if status == 200 else ""
        except (OSError, TimeoutError, ValueError, IndexError):
            out[f"node-{i}"] = ""
    return out


@dataclass
class Load:
    """Steady requests through every node's router; every failure is kept with its reason."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    async def node(self, host: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                status, doc = await get(host)
                if status == 200:
                    self.ok += 1
                    self.seen.add(str(doc.get("version")))
                else:
                    self.failures.append(f"{host}: HTTP {status}")
            except (OSError, TimeoutError, ValueError, IndexError) as exc:
                self.failures.append(f"{host}: {type(exc).__name__} {exc}")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def steady_load() -> AsyncIterator[Load]:
    load, stop = Load(), asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        for i in NODES:
            tg.create_task(load.node(DevFleet.bind_host(i, SUBNET), stop))
        try:
            yield load
        finally:
            stop.set()


async def events_of(url: str, rid: str) -> list[dict[str, object]]:
    code, out, err = await fleetwave("events", "--rollout", rid, "-o", "json", nats_url=url)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def rollout_ids(url: str) -> list[str]:
    code, out, err = await fleetwave("rollouts", "--service", "hello", "-o", "json", nats_url=url)
    assert code == 0, err
    return [r["id"] for r in json.loads(out)]


async def test_rolling_rollback_and_coordinator_kill(tmp_path: Path) -> None:
    """1.0.0 → 2.0.0 loses no request; broken 2.1.0 rolls back by itself (exit 3) to 2.0.0
    everywhere; a coordinator SIGKILLed mid-rollout is restarted and finishes it, each node
    moved exactly once."""
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        for v in ("1.0.0", "2.0.0", "2.1.0"):
            code, _, err = await fleetwave("release", "push", str(hello_bundle(v)), nats_url=url)
            assert code == 0, err

        code, out, err = await fleetwave("deploy", "hello", "1.0.0", nats_url=url,
                                         timeout=DEPLOY_TIMEOUT)
        assert code == 0, f"first install failed ({code}): {out}{err}"
        await wait_until(versions, lambda v: set(v.values()) == {"1.0.0"}, timeout=30,
                         what="every node serving 1.0.0")

        async with steady_load() as load:
            started = time.monotonic()
            code, out, err = await fleetwave("deploy", "hello", "2.0.0", "--batch", "1",
                                             nats_url=url, timeout=DEPLOY_TIMEOUT)
            rolling_s = time.monotonic() - started
            assert code == 0, f"rolling 2.0.0 failed ({code}): {out}{err}"
            async def seen() -> set[str]:
                return load.seen

            await wait_until(seen, lambda v: "2.0.0" in v, timeout=10,
                             what="the load to see the new answers")
        assert load.failures == [], load.failures[:10]
        assert load.ok > 100 and {"1.0.0", "2.0.0"} <= load.seen
        rolling_requests = load.ok
        assert set((await versions()).values()) == {"2.0.0"}

        async with steady_load() as load:
            code, out, err = await fleetwave("deploy", "hello", "2.1.0", "--progress-deadline",
                                             "20s", nats_url=url, timeout=DEPLOY_TIMEOUT)
            assert code == 3, f"2.1.0 should roll back, got {code}: {out}{err}"
        assert load.failures == [], load.failures[:10]
        assert load.seen == {"2.0.0"}
        assert set((await versions()).values()) == {"2.0.0"}
        rid = (await rollout_ids(url))[0]
        evs = await events_of(url, rid)
        failed = min(float(e["time"]) for e in evs  # type: ignore[arg-type]
                     if e["kind"] in ("node.failed", "wave.failed", "gate.failed"))
        restored = max(float(e["time"]) for e in evs  # type: ignore[arg-type]
                       if e["kind"] in ("node.rolled_back", "rollout.rolled_back"))

        # SIGKILL the coordinator while 2.0.0 → 1.0.0 is under way; a new one finishes it.
        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--bake", "2s", "--detach",
                                         nats_url=url)
        assert code == 0, err
        rid = out.strip()

        async def status() -> dict[str, object]:
            code, out, err = await fleetwave("status", rid, "-o", "json", nats_url=url)
            assert code == 0, err
            doc: dict[str, object] = json.loads(out)
            return doc

        await wait_until(status, lambda s: s["current_wave"] == 1, timeout=30,
                         what="the second wave to start")
        await fleet.coordinator.kill()
        await fleet.coordinator.start()
        final = await wait_until(status, lambda s: s["state"] != "running", timeout=90,
                                 what="the rollout to finish after the restart")
        assert final["state"] == "succeeded", final
        await wait_until(versions, lambda v: set(v.values()) == {"1.0.0"}, timeout=30,
                         what="every node serving 1.0.0")
        moved = [e["node"] for e in await events_of(url, rid) if e["kind"] == "node.updating"]
        assert sorted(moved) == ["node-1", "node-2", "node-3"], moved

        # The success retired the old slot on the three nodes in one write: real agents, which
        # announce batch signatures, were sent one signature with a proof each, and ran it.
        last = {env.node: env for env in await desired_log(url)}
        assert sorted(last) == ["node-1", "node-2", "node-3"], sorted(last)
        assert all(env.proof for env in last.values()), [len(e.proof) for e in last.values()]
        assert len({bytes(env.sig) for env in last.values()}) == 1

        async def applied() -> dict[str, int]:
            bus = await Bus.connect(url, "default", name="fleetwave-test")
            try:
                out = {}
                for node in last:
                    entry = await bus.kv_get(subjects.observed_bucket("default"), f"{node}.hello")
                    out[node] = (decode(ObservedState, entry.value).observed_generation
                                 if entry is not None and entry.value else -1)
                return out
            finally:
                await bus.close()

        await wait_until(applied, lambda got: got == {n: e.generation for n, e in last.items()},
                         timeout=30, what="every agent to run its batch-signed state")

    print(f"\nrolling 1.0.0 -> 2.0.0 on 3 nodes, batch 1: {rolling_s:.2f}s "
          f"({rolling_requests} requests through the routers, 0 failed)")
    print(f"gate failure -> last node serving 2.0.0 again: {restored - failed:.3f}s")
