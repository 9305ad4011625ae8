"""The router tests' fixture: a ``Rig`` (tests.unit.agent.router.rig), torn down whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent.router.proxy import Proxy
from tests.unit.agent.router.rig import Rig


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """A started proxy listening on a free loopback port, with no config yet."""
    proxy = Proxy()
    proxy.start()
    server = await asyncio.get_running_loop().create_server(proxy.protocol, "127.0.0.1", 0)
    r = Rig(proxy, server.sockets[0].getsockname()[1])
    try:
        yield r
    finally:
        server.close()
        await proxy.close()
        for pool in proxy.pools.values():
            pool.close()
        for up in r.upstreams:
            await up.stop()
        await server.wait_closed()
