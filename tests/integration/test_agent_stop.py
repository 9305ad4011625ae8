"""An agent that stops starts nothing: stopped together with its slots and routers (``systemctl
kill --kill-whom=all fleetwave-agent``, a test's reap of everything it started), it must not
start again what it just lost. A real broker, a real agent process, hello 1.0.0 behind its router
on a free loopback port (``hello_fleet``)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from coordinator.dev.broker import Broker
from tests.integration.procs import read_text, reaping, wait_until
from tests.integration.test_agent_services import Fleet, _agent, _leftovers, hello_fleet


@pytest.fixture
async def fleet(broker: Broker, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with hello_fleet(broker, tmp_path) as f:
        yield f


async def test_an_agent_stopped_with_its_services_starts_none_again(
    fleet: Fleet, broker: Broker
) -> None:
    """hello 1.0.0 converged; the broker stops answering (SIGSTOP), so that the agent's close
    of the bus takes seconds; the agent is told to stop, then its slot and its router are killed.
    Until it exits it starts neither again (a crashed slot is started again after 0.2 s, a router
    found gone within 2 s, by an agent that runs on), and nothing of it is left."""
    agent = _agent(fleet, broker)
    async with reaping(agent):
        gen = await fleet.desire({"a": "1.0.0"}, {"a": 100})
        await fleet.converged(gen)
        base = fleet.base.parent
        ours = {broker.pid, agent.pid}
        procs = [p for p in _leftovers(base) if p.pid not in ours]
        kinds = sorted("router" if "agent.router" in " ".join(p.cmdline()) else "slot"
                       for p in procs)
        assert kinds == ["router", "slot"], procs
        broker.signal(signal.SIGSTOP)
        try:
            agent.signal(signal.SIGTERM)
            await wait_until(lambda: read_text(agent.log_path),
                             lambda text: "stopping on SIGTERM" in text,
                             timeout=10, what="the agent to take the stop")
            for p in procs:
                p.kill()
            await asyncio.to_thread(psutil.wait_procs, procs, 5)
            await agent.wait(60)  # its close of the bus is bounded
        finally:
            broker.signal(signal.SIGCONT)
        assert agent.returncode == 0
        left = [p for p in _leftovers(base) if p.pid not in ours]
        assert left == [], await read_text(agent.log_path)
