"""agent.router.exchange, the general path: its upstream connection and its slot under a switch."""

from __future__ import annotations

import asyncio

from tests.unit.agent.router.rig import Rig, Scripted, get, ok, read_response, until


async def test_a_cancelled_exchange_closes_its_upstream_connection(rig: Rig) -> None:
    """Dropping the clients (the router stopping) cancels a POST in flight, and the upstream
    connection it was waiting on is closed, not left open."""

    async def hold(c: int, r: int, head: bytes, reader: asyncio.StreamReader, _: object) -> bool:
        await reader.readexactly(2)  # the body
        await reader.read()  # answer nothing until the router closes the connection
        return False

    up = await rig.upstream(hold)
    rig.route({"a": up})
    _, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    await until(lambda: up.requests == 1)
    await rig.proxy.drop_clients()
    await until(lambda: up.open == 0, timeout=5.0)
    writer.close()


async def test_a_slot_removed_while_the_fast_path_hands_over_is_picked_again(rig: Rig) -> None:
    """A request the fast path sent to slot b, whose pooled connection turns out stale just as a
    switch removes b, is answered by the slot the new config has (a), and counted there."""
    a: Scripted | None = None

    async def answer_a(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"from a"))
        return True

    async def switch_then_close(
        c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter
    ) -> bool:
        if r == 1:
            w.write(ok(b"from b"))
            return True
        assert a is not None
        rig.route({"a": a})  # the switch, while this request is on b's pooled connection
        return False  # which closes without a byte of answer: stale

    a = await rig.upstream(answer_a)
    b = await rig.upstream(switch_then_close)
    rig.route({"b": b})
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(get("/warm"))  # (the general path: it leaves b's connection in the pool)
    assert await read_response(reader) == (200, b"from b")
    writer.write(get("/switched"))  # the fast path, on that pooled connection
    assert await read_response(reader) == (200, b"from a")
    writer.close()
    assert b.requests == 2 and a.requests == 1
    assert rig.proxy.slots["a"].requests == 1 and rig.proxy.slots["a"].errors == 0
    await until(lambda: rig.proxy.slots["b"].failures == 1)
