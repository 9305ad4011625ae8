"""protocol.bus._while_unavailable: a read that JetStream answers 503 (a cluster without a leader
for the stream, for a moment) is made again for a bounded time; nothing else is retried."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
import pytest

from protocol.bus import _while_placing, _while_unavailable


def flaky(fails: int, error: Exception) -> tuple[list[float], Callable[[], Awaitable[str]]]:
    """A read failing ``fails`` times with ``error``, then answering "ok"; the loop times of
    its tries."""
    tries: list[float] = []

    async def read() -> str:
        tries.append(asyncio.get_running_loop().time())
        if len(tries) <= fails:
            raise error
        return "ok"

    return tries, read


async def test_a_read_answered_unavailable_is_made_again_until_it_answers() -> None:
    tries, read = flaky(3, nats.js.errors.ServiceUnavailableError())
    assert await _while_unavailable(read, wait=5.0) == "ok"
    assert len(tries) == 4
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps == sorted(gaps), gaps  # backing off


async def test_unavailable_past_the_wait_is_the_error() -> None:
    tries, read = flaky(1000, nats.js.errors.ServiceUnavailableError())
    with pytest.raises(nats.js.errors.ServiceUnavailableError):
        await _while_unavailable(read, wait=0.3)
    assert 2 <= len(tries) <= 6 and tries[-1] - tries[0] <= 0.3


@pytest.mark.parametrize("error", [nats.js.errors.NotFoundError(), nats.errors.TimeoutError(),
                                   nats.js.errors.APIError(code=500)])
async def test_other_errors_are_not_retried(error: Exception) -> None:
    tries, read = flaky(1, error)
    with pytest.raises(type(error)):
        await _while_unavailable(read, wait=5.0)
    assert len(tries) == 1


def _placement(description: str) -> nats.js.errors.BadRequestError:
    return nats.js.errors.BadRequestError(code=400, err_code=10005, description=description)


async def test_a_setup_refused_for_an_offline_peer_is_made_again_until_placed() -> None:
    """A cluster that just started refuses to place an R3 stream while a peer looks offline
    (err 10005, seen in a fresh-clone run), or does not answer in time: the idempotent setup is
    made again, bounded; any
    other refusal, and one past the wait, is the error at once."""
    tries, setup = flaky(3, _placement("no suitable peers for placement, peer offline"))
    assert await _while_placing(setup, wait=5.0) == "ok" and len(tries) == 4
    tries, setup = flaky(1000, _placement("no suitable peers for placement, peer offline"))
    with pytest.raises(nats.js.errors.BadRequestError):
        await _while_placing(setup, wait=0.5)
    assert 2 <= len(tries) < 10
    tries, setup = flaky(2, nats.errors.TimeoutError())  # the step may have been done: ask again
    assert await _while_placing(setup, wait=5.0) == "ok" and len(tries) == 3
    tries, setup = flaky(1, _placement("insufficient resources"))
    with pytest.raises(nats.js.errors.BadRequestError):
        await _while_placing(setup, wait=5.0)
    assert len(tries) == 1
