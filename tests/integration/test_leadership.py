"""Leadership with real processes: two coordinators on one fleet of real agents under steady
traffic, the leader killed (SIGKILL), frozen (SIGSTOP) or stopped (SIGTERM) mid-rollout.

What holds: a standby takes over (the takeover time is printed), the rollout succeeds with no
failed request and an audit log that tells every step once; a frozen leader that wakes after
losing the lease gets no write through (every record and desired state written after the new
leader's fence carries the new term); a lone coordinator's own pause is not read as its nodes
going offline; a coordinator with another signing key refuses to join the fleet.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from coordinator.dev.devfleet import Child, DevFleet, python_module
from protocol.bus import Bus
from protocol.messages import RolloutRecord
from protocol.signing import generate_seed, store_seed
from tests.integration.e2e_support import (
    assert_fenced_off,
    assert_told_once,
    deploy_detached,
    install,
    kv_logs,
    leader_of,
    loaded,
    push,
    record_of,
    serving,
)
from tests.integration.procs import read_text, wait_until

# Each test has a subnet of its own (127.0.15 to 127.0.18).
pytestmark = pytest.mark.holds(*(f"subnet 127.0.{n}" for n in range(15, 19)))

NODES = ["node-1", "node-2", "node-3"]


def standby(fleet: DevFleet, name: str = "coordinator-2", key_file: Path | None = None) -> Child:
    """A second coordinator of ``fleet`` (the same signing key unless told otherwise)."""
    return Child(name, python_module(
        "coordinator.daemon", "--nats", fleet.nats_url, "--fleet", fleet.fleet, "coordinator",
        "--key-file", str(key_file or fleet.key_file)), fleet.dir / "logs" / f"{name}.log")


@asynccontextmanager
async def two_coordinators(tmp_path: Path, subnet: str
                           ) -> AsyncIterator[tuple[DevFleet, Child, Bus]]:
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=subnet) as fleet:
        other = standby(fleet)
        await other.start()
        bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="leadership-test")
        try:
            await push(fleet.nats_url, "1.0.0", "2.0.0")
            await install(fleet, "1.0.0")
            yield fleet, other, bus
        finally:
            await bus.close()
            await other.stop()


def leading(fleet: DevFleet, other: Child, lease: dict[str, Any]) -> tuple[Child, Child]:
    """(the leader, the standby), by the pid the lease names."""
    if lease.get("pid") == other.pid:
        return other, fleet.coordinator
    assert lease.get("pid") == fleet.coordinator.pid, lease
    return fleet.coordinator, other


async def takeover(bus: Bus, old: dict[str, Any], since: float) -> tuple[dict[str, Any], float]:
    lease = await wait_until(lambda: leader_of(bus),
                             lambda d: d.get("holder") not in (None, old["holder"]),
                             timeout=15, interval=0.05, what="a standby to take the lease")
    return lease, time.monotonic() - since


async def rollout_to_succeed(fleet: DevFleet, bus: Bus, rid: str) -> RolloutRecord:
    final = await wait_until(lambda: record_of(bus, rid), lambda r: r.state != "running",
                             timeout=90, what="the rollout to end")
    assert final.state == "succeeded", (final.state, final.reason)
    await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"2.0.0"},
                     timeout=30, what="every node serving 2.0.0")
    return final


def baking(wave: int):  # type: ignore[no-untyped-def]
    def ok(r: RolloutRecord) -> bool:
        return r.current_wave == wave and r.waves[wave].state == "baking"
    return ok


async def test_a_standby_takes_over_a_killed_leader_mid_rollout(tmp_path: Path) -> None:
    async with two_coordinators(tmp_path, "127.0.15") as (fleet, other, bus):
        url = fleet.nats_url
        async with loaded(fleet) as traffic:
            rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "2s")
            await wait_until(lambda: record_of(bus, rid), baking(0), timeout=60,
                             what="wave 0 to bake")
            lease = await leader_of(bus)
            leader, _ = leading(fleet, other, lease)
            killed = time.monotonic()
            await leader.kill()
            new, took = await takeover(bus, lease, killed)
            print(f"\nSIGKILLed leader → standby leads: {took:.2f}s (term {lease['term']} → "
                  f"{new['term']})")
            assert new["term"] > lease["term"]
            await rollout_to_succeed(fleet, bus, rid)
        assert traffic.report.failed == 0, traffic.report.failures
        await assert_told_once(url, rid, NODES, waves=3)


async def test_a_frozen_leader_wakes_deposed_and_gets_no_write_through(tmp_path: Path) -> None:
    async with two_coordinators(tmp_path, "127.0.16") as (fleet, other, bus):
        url = fleet.nats_url
        async with loaded(fleet) as traffic:
            rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "2s")
            await wait_until(lambda: record_of(bus, rid), baking(0), timeout=60,
                             what="wave 0 to bake")
            lease = await leader_of(bus)
            frozen, _ = leading(fleet, other, lease)
            frozen.signal(signal.SIGSTOP)
            try:
                new, took = await takeover(bus, lease, time.monotonic())
                print(f"\nSIGSTOPped leader → standby leads: {took:.2f}s")
                # The old leader wakes in the middle of the rollout, with a wave to judge.
                await wait_until(lambda: record_of(bus, rid), baking(1), timeout=60,
                                 what="the new leader to start wave 1")
            finally:
                frozen.signal(signal.SIGCONT)
            await wait_until(lambda: read_text(frozen.log_path), lambda t: "stopped leading" in t,
                             timeout=15, what="the woken leader to stop leading")
            await rollout_to_succeed(fleet, bus, rid)
        assert traffic.report.failed == 0, traffic.report.failures
        await assert_told_once(url, rid, NODES, waves=3)
        # From outside: nothing of the old term landed after the new leader's fence.
        assert_fenced_off(await kv_logs(bus), new["term"], fleet.fleet)


async def test_a_lone_coordinators_own_pause_is_not_read_as_nodes_offline(tmp_path: Path) -> None:
    """Frozen for longer than nodes take to go offline, it wakes, takes its lease again and
    the rollout goes on: no node offline, no rollback."""
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet="127.0.17") as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        bus = await Bus.connect(url, fleet.fleet, name="pause-test")
        try:
            rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "3s")
            await wait_until(lambda: record_of(bus, rid), baking(0), timeout=60,
                             what="wave 0 to bake")
            fleet.coordinator.signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(5.0)  # the pause under test: > 3 missed beats of 0.5 s
            finally:
                fleet.coordinator.signal(signal.SIGCONT)
            final = await rollout_to_succeed(fleet, bus, rid)
            assert all(p.online for p in final.nodes.values()), final.nodes
        finally:
            await bus.close()
        log = await read_text(fleet.coordinator.log_path)
        assert "was paused" in log and "is offline: no heartbeat" not in log


async def test_a_coordinator_with_another_signing_key_refuses_to_join(tmp_path: Path) -> None:
    async with DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5,
                        subnet="127.0.18") as fleet:
        bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="key-test")
        try:
            await wait_until(lambda: leader_of(bus), lambda d: "holder" in d, timeout=15,
                             what="a leader")
        finally:
            await bus.close()
        key = tmp_path / "other.seed"
        store_seed(key, generate_seed())
        rogue = standby(fleet, "rogue", key)
        await rogue.start()
        code = await rogue.wait(timeout=20)
        log = await read_text(rogue.log_path)
        assert code == 2, log
        assert "signing key" in log and "same key file" in log and "Traceback" not in log

