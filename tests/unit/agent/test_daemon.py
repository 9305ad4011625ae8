"""agent.daemon: the services' local part runs while the agent still waits for NATS (a restarted
agent serves what its state file remembers with the broker away); the bus part starts once it
is connected; a stop while connecting ends the local part, which saves its state."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Agent, AgentOptions
from protocol.messages import Pace


class Services:
    """A service manager that records what the daemon runs of it."""

    def __init__(self) -> None:
        self.local = asyncio.Event()  # run_local is running
        self.saved = False  # run_local ended (the real one saves its state file then)
        self.buses: list[object] = []
        self.online = asyncio.Event()  # run_bus is running
        self.stop: asyncio.Event | None = None  # what run_local was told to heed

    async def run_local(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.local.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # as the real one reaps its runners' children first
            self.saved = True

    async def run_bus(self, bus: object) -> None:
        self.buses.append(bus)
        self.online.set()
        await asyncio.Event().wait()

    def summary(self) -> tuple[list[Any], list[Any]]:
        return [], []

    def paced(self, pace: Pace) -> None:
        pass


class Bus:
    """A connected bus that never delivers: the daemon's loops idle on it."""

    def __init__(self, services: Services) -> None:
        self.gone = asyncio.Event()
        self.connected = False  # no heartbeat nor registration goes out
        self.reconnects = 0
        self.closed = False
        self.services = services
        self.saved_before = False  # the local part had ended when the close began

    async def subscribe(self, subject: str, handler: Any) -> None:
        pass

    async def close(self) -> None:
        self.saved_before = self.services.saved
        self.closed = True


def _agent(tmp_path: Path, services: Services) -> Agent:
    options = AgentOptions(node_id="n1", nats_url="nats://127.0.0.1:1", data_dir=tmp_path,
                           heartbeat_interval=0.05)
    return Agent(options, services=lambda: services)  # type: ignore[arg-type,return-value]


async def test_services_run_while_the_agent_waits_for_nats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No broker: the local part runs at once, the bus part not at all; a stop while still
    connecting ends the local part and the run."""
    services = Services()
    agent = _agent(tmp_path, services)
    connecting = asyncio.Event()

    async def no_broker(stop: asyncio.Event) -> None:
        connecting.set()
        await stop.wait()  # as _connect: None once stopped

    monkeypatch.setattr(agent, "_connect", no_broker)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    async with asyncio.timeout(5):
        await services.local.wait()
        await connecting.wait()
    assert agent.bus is None and services.buses == [] and not services.saved
    stop.set()
    async with asyncio.timeout(5):
        await running
    assert services.saved and services.buses == []


async def test_the_bus_part_starts_once_connected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker answers after the local part started: the bus part runs on that bus; a stop
    ends both and closes the bus, the local part first (it heeds the same stop: it starts
    nothing more; and its state is saved before a close that can take seconds)."""
    services = Services()
    agent = _agent(tmp_path, services)
    bus = Bus(services)
    broker_up = asyncio.Event()

    async def late_broker(stop: asyncio.Event) -> Bus:
        await broker_up.wait()
        return bus

    monkeypatch.setattr(agent, "_connect", late_broker)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    async with asyncio.timeout(5):
        await services.local.wait()
    assert services.buses == []
    broker_up.set()
    async with asyncio.timeout(5):
        await services.online.wait()
    assert services.buses == [bus] and agent.bus is bus and services.stop is stop
    stop.set()
    async with asyncio.timeout(5):
        await running
    assert services.saved and bus.closed and bus.saved_before
