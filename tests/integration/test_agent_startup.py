"""The agent's start and stop as a process: a data dir it cannot work in is one line and exit 1,
found before it connects (not a traceback once connected, and a crash loop under systemd);
SIGHUP stops it as SIGTERM does (its last state save, its connection closed; exit 0)."""

from __future__ import annotations

import signal
from pathlib import Path

from coordinator.dev.broker import Broker, free_port
from coordinator.dev.devfleet import Child, python_module
from tests.integration.procs import wait_until

START_TIMEOUT = 20.0


def _agent(tmp_path: Path, data: Path, nats: str, *extra: str) -> Child:
    return Child("n1", python_module("agent.main", "--node-id", "n1", "--data-dir", str(data),
                                     "--nats", nats, "--heartbeat-interval", "0.3", *extra),
                 tmp_path / "agent.log")


def _nobody() -> str:
    """A NATS URL nothing answers on: an agent that tried to connect would wait for ever."""
    return f"nats://127.0.0.1:{free_port('127.0.0.1')}"


async def _refused(tmp_path: Path, data: Path) -> str:
    """Run an agent on ``data``; it must exit 1 by itself; its one line of output."""
    agent = _agent(tmp_path, data, _nobody())
    await agent.start()
    try:
        assert await agent.wait(START_TIMEOUT) == 1, agent.log_tail()
    finally:
        await agent.stop()
    text = agent.log_path.read_text()
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetwave-agent: "), text
    return lines[0]


async def test_an_unreadable_state_file_is_one_line_before_connecting(tmp_path: Path) -> None:
    """state.json that cannot be read (here a directory) stops the agent at once, before it
    connects, with one line naming the file and what to do; the file is left as it was."""
    data = tmp_path / "data"
    (data / "state.json").mkdir(parents=True)
    line = await _refused(tmp_path, data)
    assert f"{data / 'state.json'}" in line and "Is a directory" in line, line
    assert "move it aside" in line, line
    assert (data / "state.json").is_dir()


async def test_a_data_dir_the_agent_cannot_write_in_is_one_line_before_connecting(
    tmp_path: Path,
) -> None:
    """A data dir where the releases cannot be kept (here ``releases`` is a file) stops the
    agent at once, before it connects, with one line saying what to do."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "releases").write_text("not a directory")
    line = await _refused(tmp_path, data)
    assert f"the data dir {data} is not writable" in line and "--data-dir" in line, line


def _catches(pid: int | None, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(int(line.split()[1], 16) for line in status.splitlines()
                  if line.startswith("SigCgt:"))
    return bool(caught >> (signum - 1) & 1)


async def test_sighup_stops_a_connected_agent_cleanly(tmp_path: Path) -> None:
    """A connected agent given SIGHUP closes its connection, saves its state and exits 0, as
    for SIGTERM (it was killed by the signal: no final save, no drain)."""
    data = tmp_path / "data"
    async with Broker() as broker:
        agent = _agent(tmp_path, data, broker.url)
        await agent.start()
        try:
            async def log() -> str:
                return agent.log_path.read_text()

            await wait_until(log, lambda t: "connected to" in t and (data / "state.json").exists(),
                             timeout=START_TIMEOUT, what="the agent to connect")
            (data / "state.json").unlink()  # what is there after the stop is the last save
            agent.signal(signal.SIGHUP)
            assert await agent.wait(START_TIMEOUT) == 0, agent.log_tail()
        finally:
            await agent.stop()
    assert "node n1 stopped" in agent.log_path.read_text()
    assert (data / "state.json").is_file()


async def test_sighup_stops_simulated_nodes_cleanly(tmp_path: Path) -> None:
    """--simulate, still waiting for its broker, stops on SIGHUP with exit 0."""
    agent = _agent(tmp_path, tmp_path / "data", _nobody(), "--simulate", "2")
    await agent.start()
    try:
        async def stoppable() -> bool:  # its handlers are in place (SIGTERM's, with or
            return _catches(agent.pid, signal.SIGTERM)  # without one for SIGHUP)

        await wait_until(stoppable, bool, timeout=START_TIMEOUT,
                         what="the simulated nodes' signal handlers")
        agent.signal(signal.SIGHUP)
        assert await agent.wait(START_TIMEOUT) == 0, agent.log_tail()
    finally:
        await agent.stop()


async def test_an_agent_whose_connection_is_closed_for_good_stops_saying_why(
        tmp_path: Path) -> None:
    """nats-py closes a connection for good on a server -ERR it does not retry (here a message
    whose headers take it past max_payload), even with reconnect_forever: the agent stops with
    a BusError (one line, exit 1: systemd starts it again, with a new connection) instead of
    running on with a dead connection, its desired watch waiting for ever."""
    import asyncio

    import pytest

    from agent.daemon import Agent, AgentOptions
    from protocol.errors import BusError

    broker = Broker(store_dir=tmp_path / "js", max_payload="1MB")
    await broker.start()
    try:
        agent = Agent(AgentOptions(node_id="n1", nats_url=broker.url, data_dir=tmp_path / "d",
                                   heartbeat_interval=0.3))
        stop = asyncio.Event()
        running = asyncio.ensure_future(agent.run(stop))
        try:
            await wait_until(lambda: asyncio.sleep(0, agent.heartbeats), lambda n: n >= 1,
                             timeout=START_TIMEOUT, what="the agent beating")
            assert agent.bus is not None
            await agent.bus.nc.publish("fw.default.x", b"x" * (agent.bus.max_payload - 10),
                                       headers={"Pad": "p" * 200})
            async with asyncio.timeout(10):
                with pytest.raises(BusError, match="closed for good"):
                    await running
        finally:
            stop.set()
            if not running.done():
                running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    finally:
        await broker.stop()
