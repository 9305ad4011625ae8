"""Rotating the signing key on a real fleet (broker, coordinator, three agents, the real CLI),
under steady traffic, by the documented steps of ``fleetwave auth rotate-signing-key``.

What holds: services running under key A stay up through the whole rotation to key B (the same
service processes before and after, no failed request); an agent that trusts only A is named by
``check`` and ``switch`` refuses while it does; the coordinators restarted one by one (a new-key
replica stands by next to the old-key leader, and takes over when it stops) re-sign every
desired state by B at the same generation; after ``finish`` agents trusting only B take a new
deploy; a coordinator left on A refuses to join, and to lead once alone (A is retired in the
fences): exit 2, one line.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from coordinator.dev.devfleet import Child, DevFleet, python_module
from coordinator.runtime.keyfile import next_path, previous_path
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.messages import ApiReply, NodesRequest
from protocol.signing import load_seed, public_key
from tests.integration.e2e_support import (
    deploy_detached,
    desired_history,
    desired_log,
    install,
    loaded,
    push,
    record_of,
    service_pids,
    serving,
)
from tests.integration.procs import fleetwave, read_text, wait_until

SUBNET = "127.0.53"
NODES = ["node-1", "node-2", "node-3"]


async def rotate(fleet: DevFleet, phase: str, *flags: str) -> tuple[int, Any, str]:
    """``fleetwave auth rotate-signing-key PHASE --key-file KEY -o json``: (code, JSON, stderr)."""
    code, out, err = await fleetwave("auth", "rotate-signing-key", phase, "--key-file",
                                     str(fleet.key_file), "-o", "json", *flags,
                                     nats_url=fleet.nats_url)
    return code, json.loads(out) if code == 0 else None, err


async def checked(fleet: DevFleet) -> dict[str, Any]:
    code, doc, err = await rotate(fleet, "check")
    assert code == 0, err
    assert isinstance(doc, dict)
    return doc


def replica(fleet: DevFleet, name: str, key_file: Path) -> Child:
    """Another coordinator of ``fleet`` with ``key_file`` (and the KEY.previous next to it)."""
    return Child(name, python_module(
        "coordinator.daemon", "--nats", fleet.nats_url, "--fleet", fleet.fleet, "coordinator",
        "--key-file", str(key_file)), fleet.dir / "logs" / f"{name}.log")


async def trust(fleet: DevFleet, i: int, *keys: str) -> None:
    """Restart agent node-i trusting exactly ``keys`` (as an operator edits its env file)."""
    agent = fleet.agent(i)
    argv, kept = agent.argv, []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--trust-key":
            skip = True
        else:
            kept.append(arg)
    for k in keys:
        kept += ["--trust-key", k]
    agent.argv = kept
    await agent.restart()


async def every_view(fleet: DevFleet, coordinators: int) -> list[dict[str, float | None]]:
    """Each running coordinator's own view of the nodes (id -> when last heard from, None while
    offline): every coordinator answers a read, and ``fleetwave nodes`` shows the first answer
    only. A deploy is planned on the leader's view, which may lag a standby's by a heartbeat or
    two (a node that a standby already saw come back may still be offline to the leader: the
    deploy then leaves it out, by design, and "succeeds" without it). And an agent just
    restarted still looks online for up to 3 missed beats, on its old process's last beat: a
    caller that restarted agents waits for a time heard after the restart."""
    bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="rotation-views")
    try:
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox)
        await bus.nc.publish(subjects.api(fleet.fleet, "test", "nodes"),
                             encode(NodesRequest()), reply=inbox)
        views = []
        for _ in range(coordinators):
            reply = decode(ApiReply, (await sub.next_msg(timeout=5)).data)
            assert reply.ok, reply.error
            views.append({row["id"]: row["last_seen"] if row["online"] else None
                          for row in reply.data})
        await sub.unsubscribe()
        return views
    finally:
        await bus.close()


async def test_rotating_the_signing_key_moves_no_service(tmp_path: Path) -> None:
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        old = fleet.public_key
        assert old is not None
        await push(fleet.nats_url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        async with loaded(fleet) as traffic:
            before = await service_pids(fleet)
            assert len(before) == 3, before

            # begin: the new key next to the old one, 0600; refuses a second time
            code, doc, err = await rotate(fleet, "begin")
            assert code == 0, err
            new = doc["new_key"]
            assert public_key(load_seed(next_path(fleet.key_file))) == new != old
            assert (await rotate(fleet, "begin"))[0] == 2

            # agents 1 and 2 trust both keys; node-3 only the old one: named, switch refused
            await trust(fleet, 1, old, new)
            await trust(fleet, 2, old, new)
            st = await wait_until(lambda: checked(fleet),
                                  lambda d: list(d["untrusting"]) == ["node-3"], timeout=30,
                                  what="check to name node-3 alone")
            assert st["stage"] == "begun" and "node-3" in st["next"]
            code, _, err = await rotate(fleet, "switch")
            assert code == 1 and "node-3" in err and len(err.strip().splitlines()) == 1, err
            assert "Traceback" not in err and not previous_path(fleet.key_file).exists()

            # node-3 trusts both too: switch; the coordinator restarted takes over with B
            await trust(fleet, 3, old, new)
            await wait_until(lambda: checked(fleet), lambda d: not d["untrusting"], timeout=30,
                             what="every node to trust the new key")
            old_copy = fleet.dir / "old.seed"  # under the fleet: reaped with it if a test fails
            shutil.copy(fleet.key_file, old_copy)
            code, doc, err = await rotate(fleet, "switch")
            assert code == 0, err
            assert public_key(load_seed(fleet.key_file)) == new

            # a rolling restart of the coordinators: one on the new key stands by next to the
            # old-key leader, takes over when it stops and re-signs; the other comes back on B
            second = replica(fleet, "coordinator-2", fleet.key_file)
            await second.start()
            await wait_until(lambda: read_text(second.log_path),
                             lambda t: "standing by to take over" in t, timeout=20,
                             what="the new-key coordinator to stand by")
            await fleet.coordinator.stop()
            st = await wait_until(lambda: checked(fleet),
                                  lambda d: d["leader_key"] == new and not d["not_resigned"],
                                  timeout=30, what="the new leader to re-sign every state")
            assert st["stage"] == "switched" and "'finish'" in st["next"] and second.running
            log = await desired_log(fleet.nats_url)
            desired_history(log)  # no generation ever came with two contents
            last_old = {e.node: e.generation for e in log if e.key == old}
            assert {e.node: e.generation for e in log if e.key == new} == last_old, log
            await fleet.coordinator.start()

            # finish; agents then trust only B: nothing restarts, a new deploy goes through
            code, doc, err = await rotate(fleet, "finish")
            assert code == 0, err
            assert doc["still_trusting_old"] == NODES
            assert not previous_path(fleet.key_file).exists()
            for i in (1, 2, 3):
                await trust(fleet, i, new)
            # Every old agent process has exited by now; a beat of one still queued in a loaded
            # coordinator is not heard a second later, while the new ones beat every 0.5 s.
            restarted = time.time() + 1.0
            await wait_until(lambda: every_view(fleet, 2),
                             lambda vs: all((v.get(n) or 0.0) > restarted
                                            for v in vs for n in NODES),
                             timeout=30, what="both coordinators to hear every restarted node")
            assert await service_pids(fleet) == before, "a service process was restarted"
            for i in (1, 2, 3):
                said = await read_text(fleet.agent(i).log_path)
                assert "signed again by key" in said and "refused" not in said, said[-2000:]

            rid = await deploy_detached(fleet.nats_url, "2.0.0", "--batch", "1", "--bake", "1s")
            bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="rotation-test")
            try:
                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=90,
                                         what="the rollout under key B to end")
            finally:
                await bus.close()
            assert final.state == "succeeded", (final.state, final.reason)
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"2.0.0"},
                             timeout=30, what="every node serving 2.0.0")
        assert traffic.report.failed == 0, traffic.report.failures

        # a coordinator left on key A refuses to join while B leads, and to lead once B is
        # gone (A is retired in the fences): one line, exit 2; two keys never lead by turns
        for name, why in (("stale", "signing key"), ("stale-alone", "was retired")):
            if name == "stale-alone":
                await asyncio.gather(fleet.coordinator.stop(), second.stop())
            stale = replica(fleet, name, old_copy)
            await stale.start()
            code = await stale.wait(timeout=20)
            text = await read_text(stale.log_path)
            assert code == 2 and why in text and "Traceback" not in text, text
