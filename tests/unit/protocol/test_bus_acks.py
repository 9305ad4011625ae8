"""protocol.bus.Bus._on_ack: a JetStream ack for one pipelined write resolves its future with
the stream sequence, an error ack with the error (a Conflict for a lost compare-and-set), and
anything that is not a JSON object with a BusError that says so."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import nats.aio.client
import pytest

from protocol.bus import Bus
from protocol.errors import BusError, Conflict

PREFIX = "_INBOX.acks."


async def acked(data: bytes) -> int:
    """The result of the write whose ack is ``data``."""
    bus = Bus(nats.aio.client.Client(), "f")
    bus._ack_prefix = PREFIX
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    bus._acks["7"] = future
    await bus._on_ack(SimpleNamespace(subject=PREFIX + "7", data=data, headers=None))
    return await future


async def test_an_ack_gives_the_stream_sequence() -> None:
    assert await acked(b'{"stream":"KV_f-desired","seq":123456,"domain":""}') == 123456


async def test_a_refused_compare_and_set_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="wrong last sequence"):
        await acked(b'{"error":{"code":400,"err_code":10071,"description":"wrong last '
                    b'sequence: 4"}}')


@pytest.mark.parametrize("data", [b"", b"not json", b'[1, 2]', b'"seq"', b"\xff\xfe{"])
async def test_an_ack_that_is_no_json_object_is_a_bus_error(data: bytes) -> None:
    with pytest.raises(BusError, match="malformed JetStream ack"):
        await acked(data)
