"""The dashboard's handlers against what anyone who reaches the address can send: reads shared
across pages and bounded in rows, at most so many event streams, a stream that stops reading
dropped, refused tokens that cannot flood the log or crash a handler, action bodies typed."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from coordinator.auth import web_tokens
from coordinator.auth.web_tokens import TokenFile
from coordinator.http.server import build_app
from coordinator.web import handlers
from coordinator.web.feed import Feed
from coordinator.web.handlers import PAGE_NODES, Dashboard
from protocol.codec import decode
from protocol.messages import ApiReply, RollbackRequest, RolloutRequest
from tests.unit.coordinator.http.test_server import WAIT, Served, exchange, get, serving, status
from tests.unit.coordinator.web.test_snapshot import Api, Coordinator


class Suspending(Api):
    """An API whose reads suspend, as the daemon's do (the cordons are read from the bus)."""

    async def reply(self, verb: str, data: bytes, caller: str) -> ApiReply:
        await asyncio.sleep(0)
        return await super().reply(verb, data, caller)


def board_of(coord: Any, tokens: TokenFile | None = None, **kw: Any) -> Dashboard:
    return Dashboard(coord, Feed(coord), tokens, **kw)


def asked(api: Api, verb: str) -> list[Any]:
    return [r for v, r in api.asked if v == verb]


async def test_pages_woken_together_by_an_event_share_one_read_of_the_nodes() -> None:
    """50 open pages asking at once cost one read of the node table, not 50."""
    coord = Coordinator("running")
    coord.api = Suspending("running")
    board = board_of(coord)
    await asyncio.gather(*(board.snapshot("", "") for _ in range(50)))
    assert len(asked(coord.api, "nodes")) == 1


async def test_the_get_endpoints_read_a_page_of_rows_shared() -> None:
    """/api/fleet and /api/rollouts/ID ask for PAGE_NODES rows, as the stream does, and two
    requests in a row of each endpoint (/api/rollouts too) cost one read."""
    coord = Coordinator("running")
    board = board_of(coord)
    lists = 0
    answer = coord.api.reply

    async def counting(verb: str, data: bytes, caller: str) -> ApiReply:
        nonlocal lists
        lists += verb == "rollouts"
        return await answer(verb, data, caller)

    coord.api.reply = counting  # type: ignore[method-assign]
    for _ in range(2):
        await board.fleet(make_mocked_request("GET", "/api/fleet"))
        await board.rollout(make_mocked_request("GET", "/api/rollouts/r1",
                                                match_info={"id": "r1"}))
        await board.rollouts(make_mocked_request("GET", "/api/rollouts"))
    assert [r.max_nodes for r in asked(coord.api, "nodes")] == [PAGE_NODES]
    assert [(r.id, r.max_nodes) for r in asked(coord.api, "status")] == [("r1", PAGE_NODES)]
    assert lists == 1


async def test_a_flood_of_distinct_reads_does_not_push_out_the_shared_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """300 distinct rollout IDs asked (more than the cache holds) leave the nodes' shared answer
    in place: the next page reuses it."""
    monkeypatch.setattr(handlers, "SHARED", 60.0)  # nothing ages out while the test runs
    coord = Coordinator("running")
    board = board_of(coord)
    await board.snapshot("", "")
    for i in range(300):
        await board.rollout(make_mocked_request("GET", f"/api/rollouts/x{i}",
                                                match_info={"id": f"x{i}"}))
    await board.snapshot("", "")
    assert len(asked(coord.api, "nodes")) == 1


async def test_past_max_streams_a_new_one_is_refused_503_in_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With MAX_STREAMS streams open, another is 503 and says why; the open ones go on."""
    monkeypatch.setattr(handlers, "MAX_STREAMS", 2)
    async with serving() as surface:
        held = []
        try:
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", surface.port)
                held.append(writer)
                writer.write(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                async with asyncio.timeout(WAIT):
                    await reader.readuntil(b"event: snapshot\n")
            third = await exchange(surface.port, get("/api/stream", "127.0.0.1"))
        finally:
            for writer in held:
                writer.close()
    assert status(third) == 503
    assert b"2 dashboard streams are open, the most this coordinator serves" in third


class Huge(Api):
    """Nodes answers of ~1 MB that differ at every read: each poll sends a new snapshot."""

    async def reply(self, verb: str, data: bytes, caller: str) -> ApiReply:
        if verb == "nodes":
            self.asked.append((verb, None))
            return ApiReply(ok=True, data={"nodes": [{"id": "n" * 1_000_000}],
                                           "node_count": len(self.asked)})
        return await super().reply(verb, data, caller)


async def test_a_stream_that_stops_reading_is_dropped_after_write_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that reads nothing fills the buffers; WRITE_TIMEOUT after a write blocks, the
    coordinator lets go of its connection (descriptor and unsent data), not when it hangs up."""
    monkeypatch.setattr(handlers, "POLL", 0.01)
    monkeypatch.setattr(handlers, "SHARED", 0.0)
    monkeypatch.setattr(handlers, "WRITE_TIMEOUT", 0.2)
    coord: Any = Served()
    coord.api = Huge("running")
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(build_app(coord), shutdown_timeout=1.0)  # its connections are public
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert runner.server is not None
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", site.port))
            await loop.sock_sendall(sock, b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            async with asyncio.timeout(WAIT):
                assert (await loop.sock_recv(sock, 12)) == b"HTTP/1.1 200"  # then reads no more
            assert len(runner.server.connections) == 1
            deadline = time.monotonic() + 2 * WAIT
            while runner.server.connections:  # polled: nothing tells the test it went
                assert time.monotonic() < deadline, "the stalled stream's connection is kept"
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()


async def test_a_token_header_that_is_not_ascii_is_a_401_not_a_500(tmp_path: Path) -> None:
    """Bytes that are no UTF-8 in Authorization (aiohttp keeps them as surrogates) are a wrong
    token: 401 and its line, no traceback."""
    web_tokens.add(tmp_path, "alice", None, time.time())
    async with serving(tokens=TokenFile(tmp_path / web_tokens.FILE_NAME)) as surface:
        answer = await exchange(surface.port, b"GET /api/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                b"Authorization: Bearer fwt_\xff\xfe\r\nConnection: close\r\n\r\n")
    assert status(answer) == 401
    assert b"the operator token is not valid" in answer


async def test_refused_tokens_are_one_log_line_per_interval_with_their_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """20 refusals within REFUSALS_LOGGED s are one line; the next after it says how many
    came since."""
    web_tokens.add(tmp_path, "alice", None, time.time())
    now = [time.time()]
    coord = Coordinator("running")
    board = board_of(coord, TokenFile(tmp_path / web_tokens.FILE_NAME), clock=lambda: now[0])
    wrong = make_mocked_request("GET", "/api/whoami", headers={"Authorization": "Bearer nope"})
    with caplog.at_level(logging.WARNING, "fleetwave.coordinator.http"):
        for _ in range(20):
            assert (await board.whoami(wrong)).status == 401
        assert len(caplog.records) == 1
        now[0] += handlers.REFUSALS_LOGGED
        await board.whoami(wrong)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("http: refused 1 dashboard request(s)")
    assert lines[1].startswith("http: refused 20 dashboard request(s)")


async def post(port: int, path: str, token: str, body: object) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    answer = await exchange(port, (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n").encode() + data)
    return status(answer), json.loads(answer.partition(b"\r\n\r\n")[2])


async def test_action_bodies_must_be_typed_as_documented(tmp_path: Path) -> None:
    """"full" is a JSON boolean and "to_version" a string, or absent: anything else is 400 with
    a line saying so, and nothing is sent; well-typed bodies are sent as given."""
    token, path = web_tokens.add(tmp_path, "alice", None, time.time())
    coord = Served()
    async with serving(coord, TokenFile(path)) as surface:
        p = surface.port
        refused = [
            await post(p, "/api/rollouts/r1/promote", token, {"full": "false"}),
            await post(p, "/api/rollouts/r1/promote", token, {"full": 1}),
            await post(p, "/api/services/hello/rollback", token, {"to_version": 2}),
            await post(p, "/api/services/hello/rollback", token, {"to_version": None}),
        ]
        assert not coord.bus.sent
        ok = [
            await post(p, "/api/rollouts/r1/promote", token, {"full": True}),
            await post(p, "/api/rollouts/r1/promote", token, {}),
            await post(p, "/api/services/hello/rollback", token, {"to_version": "1.0.0"}),
            await post(p, "/api/services/hello/rollback", token, {}),
        ]
    assert [code for code, _ in refused] == [400] * 4
    assert [b["error"] for _, b in refused] == [
        "'full' must be true or false, not a JSON string",
        "'full' must be true or false, not a JSON number",
        "'to_version' must be a version string (or left out: the one before), not a JSON "
        "number",
        "'to_version' must be a version string (or left out: the one before), not a JSON null",
    ]
    assert [code for code, _ in ok] == [200] * 4
    sent = coord.bus.sent
    assert [decode(RolloutRequest, d).full for _, d in sent[:2]] == [True, False]
    assert [decode(RollbackRequest, d).to_version for _, d in sent[2:]] == ["1.0.0", ""]


async def test_a_page_gone_mid_write_is_no_error(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp says a client gone mid-write with a plain ConnectionError ("Connection lost"),
    not only ConnectionResetError: the stream ends quietly (it logged an ERROR with a
    traceback for every page closed while a snapshot went out)."""
    monkeypatch.setattr(handlers, "POLL", 0.01)
    sent = asyncio.Event()

    async def lost(resp: web.StreamResponse, text: str) -> None:
        sent.set()
        raise ConnectionError("Connection lost")

    monkeypatch.setattr(Dashboard, "_send", staticmethod(lost))
    caplog.set_level(logging.ERROR)
    coord: Any = Served()
    runner = web.AppRunner(build_app(coord), shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", site.port))
            await loop.sock_sendall(sock, b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            async with asyncio.timeout(WAIT):
                await sent.wait()
        assert runner.server is not None
        for _ in range(500):  # the handler's end, and what it logs: the connection gone
            if not runner.server.connections:
                break
            await asyncio.sleep(0.01)
        assert not runner.server.connections
    finally:
        await runner.cleanup()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_an_action_unanswered_may_still_be_carried_out(tmp_path: Path) -> None:
    """A request the coordinator got but did not answer in time (a frozen leader) is not said
    to be "not carried out": it may still be. Nobody subscribed at all: that one was not."""
    from protocol.errors import NoResponders, NotReachable

    token, path = web_tokens.add(tmp_path, "alice", None, time.time())
    coord = Served()
    answers: list[Exception] = [NotReachable("the coordinator did not answer within 40s"),
                                NoResponders("no coordinator answers for fleet 'default'")]

    async def unanswered(subject: str, data: bytes, timeout: float) -> bytes:
        raise answers.pop(0)

    coord.bus.request = unanswered
    async with serving(coord, TokenFile(path)) as surface:
        timed_out = await post(surface.port, "/api/rollouts/r1/abort", token, {})
        nobody = await post(surface.port, "/api/rollouts/r1/abort", token, {})
    assert timed_out[0] == nobody[0] == 503
    assert "it may still be carried out" in timed_out[1]["error"]
    assert "not carried out" not in timed_out[1]["error"]
    assert nobody[1]["error"].startswith("abort was not carried out: no coordinator answers")
