"""protocol.bus against a real broker: the pitfalls it promises to handle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.broker import Broker, free_port
from protocol.bus import Bus, Entry
from protocol.errors import Conflict, NotReachable


async def test_watch_survives_a_broker_restart(tmp_path: Path) -> None:
    """A KV watch keeps delivering changes after the broker is killed and restarted."""
    broker = Broker(store_dir=tmp_path / "js")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")
    writer = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        seen: asyncio.Queue[Entry | None] = asyncio.Queue()

        async def follow(watch: AsyncIterator[Entry | None]) -> None:
            async for e in watch:
                await seen.put(e)

        task = asyncio.create_task(follow(bus.watch("fw-t-desired", "n1.*")))
        await writer.kv_put("fw-t-desired", "n1.web", b"1")
        await _expect(seen, b"1")
        await broker.kill()
        await broker.start()
        await writer.kv_put("fw-t-desired", "n1.web", b"2")
        await writer.kv_put("fw-t-desired", "n2.web", b"other node")
        await _expect(seen, b"2")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await bus.close()
        await writer.close()
        await broker.stop()


async def _expect(q: asyncio.Queue[Entry | None], value: bytes) -> None:
    async with asyncio.timeout(20):
        while True:
            e = await q.get()
            if e is not None:
                assert e.key.startswith("n1.")
                if e.value == value:
                    return


async def test_create_is_a_lock(broker: Broker) -> None:
    """kv_create succeeds once; the second writer gets Conflict."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        rev = await bus.kv_create("fw-t-locks", "svc", b"r1")
        with pytest.raises(Conflict):
            await bus.kv_create("fw-t-locks", "svc", b"r2")
        await bus.kv_update("fw-t-locks", "svc", b"r1b", rev)
        with pytest.raises(Conflict):
            await bus.kv_update("fw-t-locks", "svc", b"r1c", rev)
    finally:
        await bus.close()


async def test_no_server_is_not_reachable() -> None:
    """Connecting where no server listens fails fast with the fix in the message."""
    with pytest.raises(NotReachable, match="fleetwave broker"):
        await Bus.connect(f"nats://127.0.0.1:{free_port()}", "t", connect_deadline=0.5)


async def test_request_without_coordinator(broker: Broker) -> None:
    """A request nobody serves says that no coordinator answers and how to start one."""
    bus = await Bus.connect(broker.url, "t")
    try:
        with pytest.raises(NotReachable, match="fleetwave coordinator"):
            await bus.request("fw.t.api.nodes", b"{}")
    finally:
        await bus.close()


async def test_a_retried_event_is_stored_once(broker: Broker) -> None:
    """The same event published twice (a retry after a lost ack) is one message in the stream."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        await bus.js_publish("fw.t.evt.x", b'{"id": "e1"}')
        await bus.js_publish("fw.t.evt.x", b'{"id": "e1"}')
        await bus.js_publish("fw.t.evt.x", b'{"id": "e2"}')
        stored = [m async for m in bus.stream_messages("FW_t_EVENTS", "fw.t.evt.>")]
    finally:
        await bus.close()
    assert stored == [b'{"id": "e1"}', b'{"id": "e2"}']
