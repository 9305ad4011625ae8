"""An agent restarted while its broker is away keeps its services converging from its state file
(``agent.host.state``: "so a restarted agent keeps converging without the bus"): after a
site-wide power cut the hosts serve again before the broker is back. A real broker, a real agent
process, hello 1.0.0 behind its router on a free loopback port (``hello_fleet``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import Event
from tests.integration.procs import reaping, wait_until
from tests.integration.test_agent_services import NODE, Fleet, _agent, hello_fleet

HOST = "127.0.0.1"  # hello_fleet's routers listen on the loopback, on a free port


@pytest.fixture
async def fleet(broker: Broker, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with hello_fleet(broker, tmp_path) as f:
        yield f


async def _status(port: int) -> int | str:
    """The status of ``GET /`` on ``port``, or what went wrong (a refused connection...)."""
    writer = None
    try:
        async with asyncio.timeout(3):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n")
            return int(head.split(b" ", 2)[1])
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        return type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _kill_group(pid: int) -> None:
    """SIGKILL the slot's process group (a crash of the service) and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        await asyncio.to_thread(psutil.Process(pid).wait, 10)


async def _started_events(bus: Bus) -> list[Event]:
    out = []
    async for data in bus.stream_messages(
        subjects.events_stream("default"), subjects.agent_events("default", NODE, "slot.started")
    ):
        out.append(decode(Event, data))
    return out


async def test_a_restarted_agent_serves_from_its_state_file_while_the_broker_is_away(
    fleet: Fleet, broker: Broker
) -> None:
    """hello 1.0.0 converged; the agent is killed, the broker stopped, the slot's processes
    killed; the agent restarted with the broker still down adopts the router and starts the
    slot again (GET answers 200 without the broker); once the broker is back the agent reports
    the new slot, and the event of its start queued meanwhile reaches the events stream."""
    first = _agent(fleet, broker)
    async with reaping(first):
        gen = await fleet.desire({"a": "1.0.0"}, {"a": 100})
        obs = await fleet.converged(gen)
        assert obs.slots["a"].status == "healthy" and await _status(fleet.port) == 200
        killed = obs.slots["a"].pid
        assert killed is not None
        await first.kill()
    await fleet.bus.close()  # a fresh connection once the broker is back
    await broker.stop()
    await _kill_group(killed)
    assert await _status(fleet.port) != 200  # the router is there, its slot is not

    second = _agent(fleet, broker)
    async with reaping(second):
        await wait_until(lambda: _status(fleet.port), lambda s: s == 200, timeout=40,
                         what="GET / answered by the restarted slot, the broker still down")
        assert second.running, second.log_tail()
        await broker.start()
        fleet.bus = await Bus.connect(broker.url, "default")
        try:
            await fleet.bus.ensure_fleet()  # the observed bucket lives in memory: made anew
            obs = await wait_until(
                fleet.observed,
                lambda o: o is not None and o.observed_generation >= gen
                and o.slots["a"].status == "healthy" and o.slots["a"].pid not in (None, killed),
                timeout=30, what="the restarted agent's report of the new slot")
            assert obs is not None and obs.phase == "converged"
            pid = obs.slots["a"].pid
            await wait_until(lambda: _started_events(fleet.bus),
                             lambda evs: any(e.data.get("pid") == pid for e in evs),
                             timeout=20, what="the slot.started event queued while away")
        finally:
            await fleet.bus.close()
