"""A real router process taken out of service (``RouterConfig.drained``, ``fleetwave drain``):
the readiness path first, then no more accepting, in-flight requests finished; undrained it
listens again; started drained it never listens."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from agent.router.health import READY_PATH
from coordinator.dev.broker import free_port
from tests.integration.procs import wait_until
from tests.integration.test_router import (  # noqa: F401  (fixtures: used by name)
    Http,
    Router,
    Service,
    cfg,
    router,
    services,
    up,
)

GRACE = 1.0


async def status_of(port: int, path: str = "/", method: str = "GET") -> int:
    """One request on a fresh connection; its status (ConnectionRefusedError: nothing listens)."""
    client = Http(port)
    try:
        status, _, _ = await client.request(method, path)
        return status
    finally:
        client.close()


async def test_ready_path_answers_for_the_router_and_is_not_counted(
        router: Router, services: list[Service]) -> None:  # noqa: F811
    """200 "ready" with a healthy slot (HEAD too, without a body), 503 without one; the
    service never sees the path and the slots' counters do not move."""
    a = Service("a")
    services.append(a)
    st = await router.client.configure(cfg(up("a", a, 100)))
    client = Http(st.port)
    status, hdrs, body = await client.request("GET", READY_PATH + "?lb=1")
    assert (status, body) == (200, b"ready\n") and hdrs.get("connection") != "close"
    status, hdrs, body = await client.request("HEAD", READY_PATH)
    assert (status, body, hdrs["content-length"]) == (200, b"", "6")
    client.close()
    await router.client.configure(cfg(up("a", a, 100, healthy=False)))
    assert await status_of(st.port, READY_PATH) == 503
    stats = await router.client.stats()
    assert sum(s.requests for s in stats.slots.values()) == 0


async def test_drained_router_says_503_then_stops_accepting_after_the_grace(
        router: Router, services: list[Service]) -> None:  # noqa: F811
    """Drained: the readiness path says 503 at once while requests are still served; after the
    grace nothing is accepted, a request in flight then still finishes (200), and a keep-alive
    connection is closed after its response. Undrained: it listens again on the same port."""
    a = Service("a")
    services.append(a)
    st = await router.client.configure(cfg(up("a", a, 100)))
    port = st.port
    assert port is not None
    keep = Http(port)
    assert (await keep.request())[0] == 200

    drained_at = time.monotonic()
    drained = msgspec.structs.replace(cfg(up("a", a, 100), port=port), drained=True,
                                      drain_grace=GRACE)
    await router.client.configure(drained)
    assert await status_of(port, READY_PATH) == 503  # at once
    assert (await keep.request())[0] == 200  # still served during the grace
    assert await status_of(port) == 200
    # A slow request that is in flight when the grace ends.
    slow = asyncio.create_task(status_of(port, "/slow=1.5"))
    await asyncio.sleep(0.2)

    async def refused() -> bool:
        try:
            await status_of(port, READY_PATH)
            return False
        except ConnectionRefusedError:
            return True

    await wait_until(refused, bool, timeout=GRACE + 10, interval=0.02,
                     what="the drained router to stop accepting")
    assert time.monotonic() - drained_at >= GRACE
    assert await slow == 200  # in flight at the close: finished
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await keep.request()  # the idle keep-alive connection was closed
    keep.close()
    await router.client.configure(drained)  # the same again: nothing changes
    assert await refused()

    await router.client.configure(cfg(up("a", a, 100), port=port))
    assert await status_of(port, READY_PATH) == 200 and await status_of(port) == 200


async def test_undrained_within_the_grace_nothing_is_cut(
        router: Router, services: list[Service]) -> None:  # noqa: F811
    """Undrained before the grace ends: the close never happens, the readiness path says 200
    again, and the keep-alive connection goes on."""
    a = Service("a")
    services.append(a)
    st = await router.client.configure(cfg(up("a", a, 100)))
    port = st.port
    assert port is not None
    keep = Http(port)
    assert (await keep.request())[0] == 200
    await router.client.configure(msgspec.structs.replace(
        cfg(up("a", a, 100), port=port), drained=True, drain_grace=GRACE))
    assert await status_of(port, READY_PATH) == 503
    await router.client.configure(cfg(up("a", a, 100), port=port))
    assert await status_of(port, READY_PATH) == 200
    await asyncio.sleep(GRACE + 0.5)  # past the grace the drain would have had
    assert (await keep.request())[0] == 200
    keep.close()


async def test_a_router_configured_drained_from_the_start_never_listens(
        router: Router, services: list[Service]) -> None:  # noqa: F811
    """A router (re)started while its node is drained binds nothing; undrained, it listens."""
    a = Service("a")
    services.append(a)
    port = free_port()
    drained = msgspec.structs.replace(cfg(up("a", a, 100), port=port), drained=True,
                                      drain_grace=GRACE)
    st = await router.client.configure(drained)
    assert st.port == port
    with pytest.raises(ConnectionRefusedError):
        await status_of(port, READY_PATH)
    await router.client.configure(cfg(up("a", a, 100), port=port))
    assert await status_of(port) == 200
