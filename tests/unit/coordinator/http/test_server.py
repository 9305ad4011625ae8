"""coordinator.http.server over a stand-in coordinator, served on 127.0.0.1: the limits of its
connections (a complete request head in time, at most so many at once) and the Host check that
keeps DNS rebinding out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator.auth.web_tokens import TokenFile
from coordinator.http import server
from coordinator.http.server import HttpSurface, host_allowed
from protocol.codec import encode
from protocol.messages import ApiReply
from tests.unit.coordinator.web.test_snapshot import Coordinator

WAIT = 5.0  # every wait on the surface is bounded by this


class Bus:
    """What the surface uses of the coordinator's bus: a connection that answers every action
    ok, and records it."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        self.sent.append((subject, data))
        return encode(ApiReply(ok=True, data={}))

    async def subscribe(self, subject: str, cb: Any) -> None:
        return None

    async def stream_records(self, *args: Any, **kwargs: Any) -> AsyncIterator[tuple[str, bytes]]:
        return
        yield


class Served(Coordinator):
    """The stand-in of tests.unit.coordinator.web.test_snapshot, with a bus."""

    def __init__(self, state: str = "running") -> None:
        super().__init__(state)
        self.bus = Bus()


@contextlib.asynccontextmanager
async def serving(coord: Any = None, tokens: TokenFile | None = None
                  ) -> AsyncIterator[HttpSurface]:
    """An HttpSurface over ``coord`` on 127.0.0.1 and a free port (``surface.port``)."""
    stand_in: Any = coord or Served()  # what the surface reads of a Coordinator
    surface = HttpSurface(stand_in, "127.0.0.1", 0, tokens=tokens)
    await surface.start()
    try:
        yield surface
    finally:
        await surface.stop()


async def exchange(port: int, data: bytes) -> bytes:
    """What the surface sends on a connection that sent ``data``, to its end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT):
            return await reader.read()
    finally:
        writer.close()


def get(path: str, host: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_a_connection_without_a_complete_request_head_in_time_is_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One that sends nothing, and one that sends half a head, are closed HEAD_TIMEOUT s after
    they opened, with nothing sent (a socket each, held for ever, was the coordinator's
    descriptors)."""
    monkeypatch.setattr(server, "HEAD_TIMEOUT", 0.3)
    async with serving() as surface:
        idle = await exchange(surface.port, b"")
        half = await exchange(surface.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        whole = await exchange(surface.port, get("/healthz", "127.0.0.1"))
    assert (idle, half) == (b"", b"")
    assert status(whole) == 200


async def test_past_max_connections_a_new_one_is_answered_503_and_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With MAX_CONNECTIONS open (each after an answer, kept alive), the next one is told why
    in one line and closed, before it sends anything."""
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 2)
    async with serving() as surface:
        held = []
        try:
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", surface.port)
                held.append(writer)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                async with asyncio.timeout(WAIT):
                    assert (await reader.readuntil(b"}")).startswith(b"HTTP/1.1 200")
            busy = await exchange(surface.port, b"")
        finally:
            for writer in held:
                writer.close()
    assert status(busy) == 503
    assert b"too many connections to this coordinator's HTTP surface (at most 2)" in busy


@pytest.mark.parametrize(
    ("host", "names", "allowed"),
    [
        ("127.0.0.1:9090", (), True),
        ("10.1.2.3", (), True),
        ("[::1]:9090", (), True),
        ("[fe80::1]", (), True),
        ("localhost:9090", (), True),
        ("LOCALHOST.", (), True),
        ("", (), True),
        ("coord.example:9090", (), False),
        ("evil.example", (), False),
        ("127.0.0.1.evil.example", (), False),
        ("coord.example:9090", ("coord.example",), True),
        ("Coord.Example.", ("coord.example",), True),
        ("localhost.evil.example", ("coord.example",), False),
    ],
)
def test_host_allowed_takes_ip_addresses_localhost_and_the_names_given(
        host: str, names: tuple[str, ...], allowed: bool) -> None:
    """A name a rebinding page could use is refused; an address, localhost or a configured
    name (any case, port aside) is not."""
    assert host_allowed(host, frozenset(names)) is allowed


async def test_a_name_not_allowed_gets_421_but_health_checks_answer_any_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """/api/*, /metrics and the page are 421 for a DNS name not allowed (one line saying what
    to do); an address, localhost or a FLEETWAVE_HTTP_HOSTS name is served; /healthz and
    /readyz answer whatever the Host."""
    monkeypatch.setenv(server.HOSTS_ENV, "dash.example, other.example")
    async with serving() as surface:
        p = surface.port
        codes = {(path, host): status(await exchange(p, get(path, host)))
                 for path in ("/api/rollouts", "/api/stream", "/metrics", "/", "/healthz",
                              "/readyz")
                 for host in (f"evil.example:{p}",)}
        served = {host: status(await exchange(p, get("/api/rollouts", host)))
                  for host in (f"127.0.0.1:{p}", f"localhost:{p}", f"[::1]:{p}",
                               f"dash.example:{p}", "Other.Example")}
        refusal = await exchange(p, get("/api/fleet", "evil.example"))
    evil = f"evil.example:{p}"
    assert {k: v for k, v in codes.items() if v == 421} == {
        ("/api/rollouts", evil): 421, ("/api/stream", evil): 421, ("/metrics", evil): 421,
        ("/", evil): 421}
    assert codes[("/healthz", evil)] == 200 and codes[("/readyz", evil)] == 200
    assert set(served.values()) == {200}
    assert b"does not answer for 'evil.example'" in refusal
    assert b"FLEETWAVE_HTTP_HOSTS" in refusal
