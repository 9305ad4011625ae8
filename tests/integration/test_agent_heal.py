"""Self-healing end to end: a real broker, a real agent, hello 2.5.0 (healthy, then /healthz
answers 503 while the process keeps running) restarted for ``health.restart_after`` under real
traffic through the router, until its restart budget is spent and the loop is reported."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.dev.broker import Broker
from coordinator.releases import push_release
from protocol.messages import Event, ObservedState
from protocol.signing import public_key
from tests.integration.procs import Child, hello_bundle, reaping, spawn_agent, wait_until
from tests.integration.test_agent_services import (
    NODE,
    Fleet,
    Load,
    _const,
    _events,
    hello_fleet,
)

SUBNET = "127.0.61"
HOST = f"{SUBNET}.1"
HEALTHY_FOR = 4  # seconds each 2.5.0 process passes its health check before failing it


@pytest.fixture
async def fleet(broker: Broker, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with hello_fleet(broker, tmp_path) as f:
        bundle = _fast_heal_bundle(tmp_path / "bundles" / "2.5.0-fast", f.port)
        f.refs["2.5.0"] = (await push_release(f.bus, bundle)).info.ref
        yield f


def _fast_heal_bundle(dest: Path, port: int) -> Path:
    """hello 2.5.0 with the test's timings: unhealthy after HEALTH_FAIL_AFTER_S=4, noticed in
    0.6 s, restart_after 1 s (so the back-off waits 1, 2 and 4 s)."""
    shutil.copytree(hello_bundle("2.5.0"), dest)
    m = dest / "fleetwave.toml"
    text = m.read_text()
    for old, new in (("port = 8080", f"port = {port}"),
                     ('HEALTH_FAIL_AFTER_S = "20"', f'HEALTH_FAIL_AFTER_S = "{HEALTHY_FOR}"'),
                     ('interval = "1s"', 'interval = "200ms"'),
                     ('restart_after = "5s"', 'restart_after = "1s"')):
        assert old in text, old
        text = text.replace(old, new)
    m.write_text(text)
    return dest


def _agent(f: Fleet, broker: Broker) -> Child:
    return spawn_agent(broker.url, NODE, f.base,
                       extra=["--trust-key", public_key(f.seed), "--bind-host", HOST])


def _slot_events(events: list[Event], slot: str) -> list[str]:
    return [e.kind for e in events if e.data.get("slot") == slot]


async def test_unhealthy_slot_is_restarted_while_the_healthy_one_loses_no_request(
    fleet: Fleet, broker: Broker
) -> None:
    """1.0.0 in a and 2.5.0 in b share the traffic; b turns unhealthy: a takes every request
    (0 failed), b is restarted and gets its share back; each restart is an event; the third
    time the budget is spent, and the loop is an event and the observed state's error."""
    async with reaping(_agent(fleet, broker)):
        gen = await fleet.desire({"a": "1.0.0", "b": "2.5.0"}, {"a": 50, "b": 50})
        await fleet.converged(gen)
        async with Load(fleet.port, host=HOST).running() as load:
            await wait_until(fleet.observed, lambda o: o is not None and (
                o.slots["b"].restarts >= 1 and o.slots["b"].status == "healthy"),
                timeout=30, what="slot b restarted and healthy again")
            back = load.versions.get("2.5.0", 0)
            await wait_until(_const(load), lambda ld: ld.versions.get("2.5.0", 0) > back + 20,
                             timeout=20, what="traffic back on the restarted slot b")
            obs = await wait_until(fleet.observed, lambda o: o is not None and o.phase == "failed",
                                   timeout=60, what="the restart loop in the observed state")
            served = load.ok
            await wait_until(_const(load), lambda ld: ld.ok > served + 50, timeout=20,
                             what="slot a serving through the loop")
        assert load.failed == 0, load.errors
        assert obs is not None
        _assert_loop(obs)
        events = await _events(fleet.bus, "slot.>")
        restarting = [e for e in events if e.kind == "slot.restarting"]
        assert [e.data.get("slot") for e in restarting] == ["b", "b", "b"]
        assert "health.restart_after 1s" in restarting[0].message
        assert [e.data.get("restarts") for e in restarting] == [1, 2, 3]
        assert [e.data.get("slot") for e in events if e.kind == "slot.restart_loop"] == ["b"]
        assert "slot.restarting" not in _slot_events(events, "a")


def _assert_loop(obs: ObservedState) -> None:
    assert "slot b (2.5.0) is in a restart loop: unhealthy again after 3 restarts" in obs.error
    assert obs.slots["b"].status == "unhealthy" and obs.slots["b"].restarts == 3
    assert obs.slots["a"].status == "healthy" and obs.weights == {"a": 50}


async def test_alone_the_slot_is_restarted_make_before_break(fleet: Fleet, broker: Broker) -> None:
    """2.5.0 alone in a: once it stayed unhealthy for restart_after, 2.5.0 starts in slot b,
    serves, and only then is a stopped and started again; traffic returns to a, b is retired."""
    async with reaping(_agent(fleet, broker)):
        gen = await fleet.desire({"a": "2.5.0"}, {"a": 100})
        await fleet.converged(gen)
        obs = await wait_until(fleet.observed, lambda o: o is not None and (
            o.slots["a"].restarts >= 1 and o.weights == {"a": 100}
            and o.slots["b"].status == "stopped"),
            timeout=40, what="slot a restarted, serving, and the bridge b retired")
        assert obs is not None and obs.slots["a"].status == "healthy"
        async with Load(fleet.port, host=HOST).running() as load:
            await wait_until(_const(load), lambda ld: ld.ok > 20, timeout=10,
                             what="traffic on the restarted slot")
        events = await _events(fleet.bus, "slot.>")
        order = [(e.kind, e.data.get("slot")) for e in events]
        healed = order.index(("slot.restarting", "a"))
        assert order.index(("slot.healthy", "b")) < healed  # the bridge served first
        assert order.index(("slot.started", "b")) < healed
        after = order[healed:]
        assert after.index(("slot.stopped", "a")) < after.index(("slot.started", "a"))
        assert after.index(("slot.healthy", "a")) < after.index(("slot.draining", "b"))
        assert load.failed == 0, load.errors
