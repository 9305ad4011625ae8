"""Through a real router process to real live and shadow upstreams that record what they get:
the shadow never sees the user's Cookie or Authorization unless the mirror keeps that header,
while the live slot gets the request as the user sent it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from agent.router import RouterClient, RouterConfig, RouterUnavailable, Upstream, start_router
from protocol.messages import MirrorSpec
from tests.integration.mirror_upstream import RecordingUpstream

CREDENTIALS = (
    "Cookie: session=user-secret\r\n"
    "Authorization: Bearer user-token\r\n"
    "Proxy-Authorization: Basic cHJveHk6cGFzcw==\r\n"
    "X-Foo: foo\r\n"
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        await asyncio.sleep(0.02)
    return False


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[RouterClient]:
    """A router process of its own; no traceback in its log when it is shut down."""
    sock, log = tmp_path / "r.sock", tmp_path / "r.log"
    pid = await start_router(sock, log)
    rc = RouterClient(sock)
    try:
        yield rc
    finally:
        with contextlib.suppress(RouterUnavailable):
            await rc.shutdown()
        if not await _wait_gone(pid):
            os.kill(pid, signal.SIGKILL)
        assert "Traceback" not in log.read_text()


@pytest.fixture
async def slots() -> AsyncIterator[tuple[RecordingUpstream, RecordingUpstream]]:
    live, shadow = await RecordingUpstream().start(), await RecordingUpstream().start()
    try:
        yield live, shadow
    finally:
        await live.close()
        await shadow.close()


async def get(port: int, path: str, headers: str) -> int:
    """One GET on a fresh connection; the status (the body is read and dropped)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: svc\r\n{headers}\r\n".encode())
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        return int(head.split(b" ")[1])
    finally:
        writer.close()


async def mirrored_get(
    client: RouterClient, live: RecordingUpstream, shadow: RecordingUpstream, mirror: MirrorSpec
) -> tuple[dict[str, str], dict[str, str]]:
    """Configure live at weight 1 and the shadow at 0 with ``mirror``, send one GET with
    credentials; the headers the live slot and the shadow each received."""
    st = await client.configure(RouterConfig(
        service="hello", listen_host="127.0.0.1", listen_port=0, mirror=mirror,
        upstreams=[Upstream(slot="a", port=live.port, weight=1, healthy=True),
                   Upstream(slot="b", port=shadow.port, weight=0, healthy=True)],
    ))
    assert st.port
    assert await get(st.port, "/x", CREDENTIALS) == 200
    await live.wait_for(1)
    await shadow.wait_for(1)
    return live.headers(0), shadow.headers(0)


async def test_shadow_gets_no_cookie_nor_authorization_by_default(
    client: RouterClient, slots: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """By default the copy loses Cookie and Authorization (Proxy-Authorization is hop-by-hop and
    reaches no upstream); the live slot keeps the user's credentials."""
    live, shadow = slots
    seen_live, seen_shadow = await mirrored_get(client, live, shadow,
                                                MirrorSpec(slot="b", percent=100))
    assert seen_live["cookie"] == "session=user-secret"
    assert seen_live["authorization"] == "Bearer user-token"
    assert "proxy-authorization" not in seen_live
    assert not {"cookie", "authorization", "proxy-authorization"} & set(seen_shadow), seen_shadow
    assert seen_shadow["x-foo"] == "foo" and seen_shadow["host"] == "svc"
    assert b"user-secret" not in shadow.heads[0] and b"user-token" not in shadow.heads[0]


async def test_a_kept_header_reaches_the_shadow(
    client: RouterClient, slots: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """--mirror-keep-header Cookie sends the Cookie to the shadow; Authorization still not."""
    live, shadow = slots
    _, seen_shadow = await mirrored_get(client, live, shadow, MirrorSpec(
        slot="b", percent=100, keep_headers=["Cookie", "x-foo"]))
    assert seen_shadow["cookie"] == "session=user-secret"
    assert "authorization" not in seen_shadow and seen_shadow["x-foo"] == "foo"
