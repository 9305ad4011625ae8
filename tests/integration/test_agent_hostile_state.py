"""A state file that decodes but names what no agent wrote: a real agent, stopped, its state file
tampered with, started again. It must come up, leave alone what is not its own, and converge."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from coordinator.dev.broker import Broker
from coordinator.dev.devfleet import Child
from protocol.messages import ObservedState
from protocol.signing import public_key
from tests.integration.procs import reaping, spawn_agent, wait_until
from tests.integration.test_agent_services import NODE, Fleet, hello_fleet


@pytest.fixture
async def fleet(broker: Broker, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with hello_fleet(broker, tmp_path) as f:
        yield f


def _agent(fleet: Fleet, broker: Broker) -> Child:
    return spawn_agent(broker.url, NODE, fleet.base, extra=["--trust-key", public_key(fleet.seed)])


def _tamper(fleet: Fleet, **record: object) -> None:
    """Set fields of slot a's record in the stopped agent's state file."""
    path = fleet.base / NODE / "state.json"
    state = json.loads(path.read_text())
    state["services"]["hello"]["slots"]["a"].update(record)
    path.write_text(json.dumps(state))


async def _converged_or_dead(fleet: Fleet, agent: Child, gen: int) -> ObservedState | None:
    """The observed state once ``gen`` is converged, or None as soon as the agent has exited."""
    async def probe() -> ObservedState | None:
        return await fleet.observed() if agent.running else None

    return await wait_until(
        probe, lambda o: not agent.running or (o is not None and o.observed_generation >= gen
                                               and o.phase == "converged"),
        timeout=40, what=f"generation {gen} converged (or the agent's exit)")


async def test_a_negative_pid_in_the_state_file_is_skipped_and_the_agent_converges(
    fleet: Fleet, broker: Broker
) -> None:
    """Slot a's pid set to -1 while the agent was stopped: the agent starts (it exited 1 at
    every start: psutil's ValueError), says in one line that the record is skipped, stops the
    slot's process that record hid (an orphan) and converges with slot a started again."""
    agent = _agent(fleet, broker)
    async with reaping(agent):
        obs = await fleet.converged(await fleet.desire({"a": "1.0.0"}, {"a": 100}))
        old = obs.slots["a"].pid
        await agent.stop()
        _tamper(fleet, pid=-1)
        await agent.start()
        gen = await fleet.desire({"a": "1.0.0", "b": "2.0.0"}, {"a": 50, "b": 50})
        obs = await _converged_or_dead(fleet, agent, gen)
        assert obs is not None, f"the agent exited {agent.returncode}: {agent.log_tail()}"
        assert obs.slots["a"].status == "healthy" and obs.slots["a"].pid not in (old, -1)
        assert obs.slots["b"].status == "healthy"
    log = (fleet.base / "logs" / f"{NODE}.log").read_text()
    assert ("slot hello/a of the state file is skipped: pid -1 is not a process id; it will be "
            "started again") in log
    assert f"stopping 1 slot process(es) no state record accounts for: pids {old}" in log


async def test_a_process_that_is_not_a_slot_named_by_the_state_file_is_never_signalled(
    fleet: Fleet, broker: Broker
) -> None:
    """Slot a's record pointed (pid and create_time) at an unrelated process that leads its own
    session (a ``sleep``, standing for any daemon of the host) while the agent was stopped: the
    agent does not adopt it (one line says why), starts slot a again, and a deploy that stops
    slot a leaves that process alone. A review found it adopted, and its group SIGTERMed by
    that deploy."""
    agent = _agent(fleet, broker)
    victim = await asyncio.create_subprocess_exec("sleep", "600", start_new_session=True)
    try:
        async with reaping(agent):
            await fleet.converged(await fleet.desire({"a": "1.0.0"}, {"a": 100}))
            await agent.stop()
            _tamper(fleet, pid=victim.pid, create_time=psutil.Process(victim.pid).create_time())
            await agent.start()
            gen = await fleet.desire({"a": "1.0.0"}, {"a": 100})
            obs = await _converged_or_dead(fleet, agent, gen)
            assert obs is not None, f"the agent exited {agent.returncode}: {agent.log_tail()}"
            assert obs.slots["a"].status == "healthy" and obs.slots["a"].pid != victim.pid
            gen = await fleet.desire({"b": "2.0.0"}, {"b": 100})  # slot a is stopped
            obs = await wait_until(
                fleet.observed, lambda o: o is not None and o.observed_generation >= gen
                and o.phase == "converged" and o.slots["a"].status == "stopped",
                timeout=40, what="slot a stopped")
            assert victim.returncode is None
        log = (fleet.base / "logs" / f"{NODE}.log").read_text()
        assert (f"slot hello/a (pid {victim.pid}) is not adopted: it works in {Path.cwd()}, not "
                f"in {fleet.base / NODE / 'releases'}/") in log
    finally:
        victim.kill()
        await asyncio.wait_for(victim.wait(), 5)
