"""The router as a real process: real upstream HTTP servers in subprocesses, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from agent.router import (
    RouterClient,
    RouterConfig,
    RouterRunning,
    RouterUnavailable,
    Upstream,
    start_router,
)
from protocol.messages import MirrorSpec, RouterStats
from tests.integration.procs import ended

# An upstream service: ThreadingHTTPServer in its own process. argv: NAME MODE. Prints its port.
# On SIGTERM it stops accepting, finishes the requests in flight, and exits (a graceful stop).
UPSTREAM = textwrap.dedent(
    r"""
    import hashlib, json, os, signal, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    NAME, MODE = sys.argv[1], sys.argv[2]
    active = 0
    lock = threading.Lock()
    seq = 0

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 1 << 16  # one write per response: no Nagle/delayed-ACK stalls

        def log_message(self, *a):
            pass

        def reply(self, status, body, ctype="application/json", extra=()):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("X-Slot", NAME)
            for k, v in extra:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def parse_request(self):
            global active
            ok = super().parse_request()
            if ok:  # a request is in flight from its head on; an idle keep-alive is not
                with lock:
                    active += 1
                self.counted = True
            return ok

        def handle_one_request(self):
            global active
            self.counted = False
            try:
                super().handle_one_request()
            finally:
                if self.counted:
                    with lock:
                        active -= 1

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            global seq
            if MODE == "hang":
                time.sleep(3600)
            path = self.path
            if path.startswith("/slow"):
                time.sleep(float(path.split("=")[1]))
            if path == "/nocontent":
                self.send_response(204)
                self.send_header("X-Slot", NAME)
                self.end_headers()
                return
            if path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("X-Slot", NAME)
                self.end_headers()
                for part in (b"hello ", b"chunked ", b"world"):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
                return
            if path == "/close":
                self.send_response(200)
                self.send_header("X-Slot", NAME)
                self.end_headers()
                self.wfile.write(b"until close " * 1000)
                self.close_connection = True
                return
            with lock:
                seq += 1
                n = seq
            value = "other" if (MODE == "differ" and path == "/diff") else "same"
            status = 500 if (MODE == "differ" and path == "/status") else 200
            body = json.dumps({"id": f"{NAME}-{n}", "value": value, "path": path,
                               "xff": self.headers.get("X-Forwarded-For"),
                               "host": self.headers.get("Host")}).encode()
            self.reply(status, body, extra=[("X-Request-Id", f"{NAME}-{n}")])

        def do_POST(self):
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    data += self.rfile.read(size)
                    self.rfile.readline()
            else:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = json.dumps({"slot": NAME, "len": len(data),
                               "sha": hashlib.sha256(data).hexdigest()}).encode()
            self.reply(200, body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True

    def stop(*_):
        def run():
            srv.shutdown()
            srv.server_close()
            deadline = time.monotonic() + 10
            while active and time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(0)
        threading.Thread(target=run).start()

    signal.signal(signal.SIGTERM, stop)
    print(srv.server_port, flush=True)
    srv.serve_forever()
    """
)


class Service:
    """One upstream process."""

    def __init__(self, name: str, mode: str = "ok") -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            [sys.executable, "-c", UPSTREAM, name, mode], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        """Graceful stop (SIGTERM), reaped."""
        if self.proc.poll() is None:
            # A hung service never finishes its requests: no point waiting for a graceful stop.
            self.proc.send_signal(signal.SIGKILL if self.mode == "hang" else signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    made: list[Service] = []
    yield made
    for s in made:
        s.stop()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return False


class Router:
    def __init__(self, sock: Path, log: Path, pid: int) -> None:
        self.sock, self.log, self.pid = sock, log, pid
        self.client = RouterClient(sock)


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[Router]:
    sock, log = tmp_path / "r.sock", tmp_path / "r.log"
    pid = await start_router(sock, log)
    r = Router(sock, log, pid)
    try:
        yield r
    finally:
        with contextlib.suppress(RouterUnavailable):
            await r.client.shutdown()
        if not await asyncio.to_thread(_wait_gone, pid):
            os.kill(pid, signal.SIGKILL)
        log_text = log.read_text()
        assert "Traceback" not in log_text, log_text


def cfg(*ups: Upstream, port: int = 0, mirror: MirrorSpec | None = None) -> RouterConfig:
    return RouterConfig(
        service="hello", listen_host="127.0.0.1", listen_port=port, upstreams=list(ups),
        mirror=mirror, drain_timeout=5.0,
    )


def up(slot: str, svc: Service, weight: int, healthy: bool = True) -> Upstream:
    return Upstream(slot=slot, port=svc.port, weight=weight, healthy=healthy)


class Http:
    """A tiny keep-alive HTTP/1.1 client (Content-Length, chunked and until-close bodies)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self, method: str = "GET", path: str = "/", body: bytes = b"", headers: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        if self.conn is None:
            self.conn = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.conn
        chunked = "transfer-encoding" in headers.lower()
        sized = (body or method == "POST") and not chunked
        length = f"Content-Length: {len(body)}\r\n" if sized else ""
        head = f"{method} {path} HTTP/1.1\r\nHost: svc.example\r\n{length}{headers}\r\n"
        writer.write(head.encode() + body)
        async with asyncio.timeout(15):
            head = await reader.readuntil(b"\r\n\r\n")
            while head.startswith(b"HTTP/1.1 1"):  # interim (100 Continue): the answer follows
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            pairs = (ln.partition(":") for ln in lines[1:] if ln)
            hdrs = {k.lower(): v.strip() for k, _, v in pairs}
            if method == "HEAD" or status in (204, 304):
                data = b""
            elif "content-length" in hdrs:
                data = await reader.readexactly(int(hdrs["content-length"]))
            elif hdrs.get("transfer-encoding") == "chunked":
                data = b""
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    data += (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read()
        if hdrs.get("connection") == "close" or ("content-length" not in hdrs and not (
            hdrs.get("transfer-encoding") or method == "HEAD" or status in (204, 304)
        )):
            self.close()
        return status, hdrs, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


async def get_slot(port: int) -> str:
    c = Http(port)
    try:
        status, hdrs, _ = await c.request()
        assert status == 200
        return hdrs["x-slot"]
    finally:
        c.close()


async def wait_stats(router: Router, pred: object, timeout: float = 15.0) -> RouterStats:
    """Poll the router's stats until ``pred(stats)`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await router.client.stats()
        if pred(st):  # type: ignore[operator]
            return st
        assert time.monotonic() < deadline, f"condition not reached: {st}"
        await asyncio.sleep(0.05)


async def test_weights_split_traffic_exactly(router: Router, services: list[Service]) -> None:
    """Weights 3:1 send exactly 3 of every 4 requests to a, on one keep-alive connection."""
    a, b = Service("a"), Service("b")
    services += [a, b]
    st = await router.client.configure(cfg(up("a", a, 3), up("b", b, 1)))
    assert st.weights == {"a": 3, "b": 1} and st.pid == router.pid and st.port
    client = Http(st.port)
    seen = Counter()
    for _ in range(40):
        status, hdrs, body = await client.request()
        assert status == 200
        seen[hdrs["x-slot"]] += 1
        assert json.loads(body)["xff"] == "127.0.0.1"
        assert json.loads(body)["host"] == "svc.example"
    client.close()
    assert seen == {"a": 30, "b": 10}
    st = await router.client.stats()
    assert st.slots["a"].requests == 30 and st.slots["b"].requests == 10
    assert sum(st.slots["a"].latency) == 30 and st.slots["a"].errors == 0


async def test_unhealthy_or_zero_weight_slot_gets_nothing(
    router: Router, services: list[Service]
) -> None:
    """An unhealthy slot, then a weight-0 slot, get no request; with neither serving: a fast 503."""
    a, b = Service("a"), Service("b")
    services += [a, b]
    st = await router.client.configure(cfg(up("a", a, 1), up("b", b, 9, healthy=False)))
    assert {await get_slot(st.port) for _ in range(20)} == {"a"}
    await router.client.configure(cfg(up("a", a, 1), up("b", b, 0)))
    assert {await get_slot(st.port) for _ in range(20)} == {"a"}
    await router.client.configure(cfg(up("a", a, 5, healthy=False), up("b", b, 0)))
    client = Http(st.port)
    status, _, body = await client.request()
    client.close()
    assert status == 503
    assert b"no healthy upstream for hello" in body and b"slot a unhealthy" in body
    st = await router.client.stats()
    assert st.slots["b"].requests == 0 and st.slots["a"].requests == 40
    assert st.slots["router"].errors == 1


async def _load(
    port: int, stop: asyncio.Event, results: Counter[str], *, keep_alive: bool
) -> None:
    client = Http(port)
    try:
        while not stop.is_set():
            try:
                status, hdrs, _ = await client.request()
            except (OSError, asyncio.IncompleteReadError) as exc:
                results[f"error {exc!r}"] += 1
                client.close()
                continue
            results[f"{status} {hdrs.get('x-slot')}"] += 1
            if not keep_alive:
                client.close()
    finally:
        client.close()


async def test_weight_switch_under_load_loses_nothing(
    router: Router, services: list[Service]
) -> None:
    """Switching a→b→a under keep-alive and fresh-connection load answers every request with 200."""
    a, b = Service("a"), Service("b")
    services += [a, b]
    st = await router.client.configure(cfg(up("a", a, 1), up("b", b, 0)))
    stop, results = asyncio.Event(), Counter[str]()
    loads = [
        asyncio.create_task(_load(st.port, stop, results, keep_alive=i % 2 == 0))
        for i in range(6)
    ]
    keep = Http(st.port)
    try:
        for weights in ((0, 1), (1, 0), (0, 1)):
            await asyncio.sleep(0.3)
            await router.client.configure(cfg(up("a", a, weights[0]), up("b", b, weights[1])))
            # The next request on an already open keep-alive connection sees the switch.
            _, hdrs, _ = await keep.request()
            assert hdrs["x-slot"] == ("a" if weights[0] else "b")
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*loads)
        keep.close()
    assert set(results) == {"200 a", "200 b"}, results
    assert sum(results.values()) > 100


async def test_stopping_old_upstream_after_switch_loses_nothing(
    router: Router, services: list[Service]
) -> None:
    """Stopping slot a right after a switch to b costs no request (stale pooled links retried)."""
    a, b = Service("a"), Service("b")
    services += [a, b]
    st = await router.client.configure(cfg(up("a", a, 1), up("b", b, 0)))
    stop, results = asyncio.Event(), Counter[str]()
    loads = [
        asyncio.create_task(_load(st.port, stop, results, keep_alive=i % 2 == 0))
        for i in range(6)
    ]
    try:
        await asyncio.sleep(0.5)
        await router.client.configure(cfg(up("a", a, 0), up("b", b, 1)))
        await asyncio.to_thread(a.stop)
        await asyncio.sleep(0.5)
        # And back again to a stopped slot's replacement: c on a's slot, b stopped.
        c = Service("c")
        services.append(c)
        await router.client.configure(cfg(up("a", c, 1), up("b", b, 0)))
        await asyncio.to_thread(b.stop)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*loads)
    assert all(k.startswith("200 ") for k in results), results
    assert results["200 c"] > 0


async def test_mirror_compares_and_users_get_live_answers(
    router: Router, services: list[Service]
) -> None:
    """Mirrored copies reach the shadow; users see only live answers; differences are sampled."""
    a, b = Service("a"), Service("b", "differ")
    services += [a, b]
    spec = MirrorSpec(
        slot="b", percent=100, ignore_headers=["X-Request-Id", "x-slot"], ignore_json_fields=["id"]
    )
    st = await router.client.configure(cfg(up("a", a, 1), up("b", b, 0), mirror=spec))
    client = Http(st.port)
    for path in ["/same"] * 6 + ["/diff", "/status"]:
        status, hdrs, _ = await client.request(path=path)
        assert status == 200 and hdrs["x-slot"] == "a"
    status, hdrs, _ = await client.request("POST", "/write", body=b"x")  # not a mirrored method
    assert status == 200
    client.close()
    st = await wait_stats(router, lambda s: s.mirror is not None and s.mirror.compared == 8)
    m = st.mirror
    assert m is not None
    assert (m.mirrored, m.mismatched, m.dropped, m.shadow_errors) == (8, 2, 0, 0)
    whats = {s.path: s.what for s in m.samples}
    assert whats == {"/diff": "json field $.value", "/status": "status 200 vs 500"}
    assert sum(m.shadow_latency) == 8 and sum(m.live_latency) == 8
    assert st.slots["b"].requests == 0  # shadow answers are not user traffic


async def test_mirror_percent_and_dead_shadow(router: Router, services: list[Service]) -> None:
    """A shadow that never answers costs users nothing; copies beyond the queue are dropped."""
    a, b = Service("a"), Service("b", "hang")
    services += [a, b]
    spec = MirrorSpec(slot="b", percent=50)
    st = await router.client.configure(cfg(up("a", a, 1), up("b", b, 0), mirror=spec))
    client = Http(st.port)
    started = time.monotonic()
    for _ in range(400):
        status, hdrs, _ = await client.request()
        assert status == 200 and hdrs["x-slot"] == "a"
    elapsed = time.monotonic() - started
    client.close()
    st = await router.client.stats()
    m = st.mirror
    assert m is not None
    assert m.mirrored + m.dropped == 200  # exactly half of the eligible requests
    assert m.dropped > 0 and m.compared == 0
    assert elapsed < 30  # not 400 x the shadow timeout: users never waited for the shadow
    st = await wait_stats(router, lambda s: s.mirror.shadow_errors > 0, timeout=20)


async def test_router_survives_sigkill_of_its_spawner(
    tmp_path: Path, services: list[Service]
) -> None:
    """The router started by a helper process keeps serving after kill -9 of that helper."""
    a = Service("a")
    services.append(a)
    sock, log = tmp_path / "r.sock", tmp_path / "r.log"
    helper = textwrap.dedent(
        f"""
        import asyncio, time
        from pathlib import Path
        from agent.router import RouterClient, RouterConfig, Upstream, start_router
        async def main():
            pid = await start_router(Path({str(sock)!r}), Path({str(log)!r}))
            st = await RouterClient(Path({str(sock)!r})).configure(RouterConfig(
                service="hello", listen_host="127.0.0.1", listen_port=0,
                upstreams=[Upstream(slot="a", port={a.port}, weight=1, healthy=True)]))
            print(pid, st.port, flush=True)
        asyncio.run(main())
        time.sleep(3600)
        """
    )
    proc = subprocess.Popen(  # noqa: ASYNC220  # returns at once; read via to_thread below
        [sys.executable, "-c", helper], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        pid, port = map(int, (await asyncio.to_thread(proc.stdout.readline)).split())
        assert os.getsid(pid) not in (os.getsid(proc.pid), os.getsid(0))
        proc.kill()
        proc.wait()
        for _ in range(20):
            assert await get_slot(port) == "a"
        assert await RouterClient(sock).ping() == pid
        await RouterClient(sock).shutdown()
        assert await asyncio.to_thread(_wait_gone, pid)
    finally:
        ended(proc)
        with contextlib.suppress(ProcessLookupError):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


async def test_garbage_on_the_listening_port(router: Router, services: list[Service]) -> None:
    """Garbage gets 400/431 (or a closed connection), never a crash; the router keeps serving."""
    a = Service("a")
    services.append(a)
    st = await router.client.configure(cfg(up("a", a, 1)))
    cases = [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200) + b"\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
         400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n bad fold\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None),
        (b"GET / HTT", 400),
        (os.urandom(5000), None),
    ]
    for data, want in cases:
        r, w = await asyncio.open_connection("127.0.0.1", st.port)
        w.write(data)
        with contextlib.suppress(OSError):
            w.write_eof()
        async with asyncio.timeout(10):
            answer = await r.read()
        w.close()
        if want is not None:
            assert answer.startswith(f"HTTP/1.1 {want} ".encode()), (data[:40], answer[:80])
    assert await get_slot(st.port) == "a"
    assert await router.client.ping() == router.pid


async def test_bodies_and_framing(router: Router, services: list[Service]) -> None:
    """Request bodies (length, chunked, large), chunked and until-close responses, HEAD, 204."""
    a = Service("a")
    services.append(a)
    st = await router.client.configure(cfg(up("a", a, 1)))
    client = Http(st.port)
    big = os.urandom(3 * 1024 * 1024)  # larger than the buffer: streamed, not buffered
    for data in (b"hello", big):
        status, _, body = await client.request("POST", "/echo", body=data)
        assert status == 200
        assert json.loads(body)["sha"] == hashlib.sha256(data).hexdigest()
    chunked = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    status, _, body = await client.request(
        "POST", "/echo", headers="Transfer-Encoding: chunked\r\n", body=chunked
    )
    assert json.loads(body)["sha"] == hashlib.sha256(b"hello world").hexdigest()
    status, _, body = await client.request(
        "POST", "/echo", headers="Expect: 100-continue\r\n", body=b"xyz"
    )
    assert status == 200 and json.loads(body)["len"] == 3  # the 100 was passed over by the client
    status, hdrs, body = await client.request(path="/chunked")
    assert (status, body, hdrs["transfer-encoding"]) == (200, b"hello chunked world", "chunked")
    status, hdrs, body = await client.request("HEAD", "/x")
    assert status == 200 and body == b"" and int(hdrs["content-length"]) > 0
    status, _, body = await client.request(path="/nocontent")
    assert status == 204
    status, _, body = await client.request(path="/")  # keep-alive still fine after all of that
    assert status == 200
    status, hdrs, body = await client.request(path="/close")
    # An until-close body reaches an HTTP/1.1 client chunked, its connection kept for the next.
    assert body == b"until close " * 1000 and hdrs["transfer-encoding"] == "chunked"
    assert "connection" not in hdrs and client.conn is not None
    kept = client.conn
    status, _, body = await client.request(path="/")
    assert status == 200 and client.conn is kept
    client.close()


async def test_busy_port_is_refused_and_old_config_stays(
    router: Router, services: list[Service]
) -> None:
    """A config whose port is taken is refused with the reason; the running one keeps serving."""
    a = Service("a")
    services.append(a)
    st = await router.client.configure(cfg(up("a", a, 1)))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(RouterUnavailable, match=r"cannot listen on 127\.0\.0\.1:.*in use"):
            await router.client.configure(cfg(up("a", a, 0), port=taken.getsockname()[1]))
    finally:
        taken.close()
    with pytest.raises(RouterUnavailable, match="mirror slot b also serves users"):
        await router.client.configure(
            cfg(up("a", a, 1), up("b", a, 1), mirror=MirrorSpec(slot="b", percent=5))
        )
    after = await router.client.stats()
    assert after.port == st.port and after.weights == {"a": 1}
    assert await get_slot(st.port) == "a"


async def test_reconfigure_keeps_connections_and_second_start_is_refused(
    router: Router, services: list[Service], tmp_path: Path
) -> None:
    """Reconfiguring the same address keeps open connections; a second start_router is refused."""
    a, b = Service("a"), Service("b")
    services += [a, b]
    st = await router.client.configure(cfg(up("a", a, 1), up("b", b, 0)))
    client = Http(st.port)
    assert (await client.request())[1]["x-slot"] == "a"
    conn = client.conn
    st2 = await router.client.configure(cfg(up("a", a, 0), up("b", b, 1), port=st.port))
    assert st2.port == st.port
    assert (await client.request())[1]["x-slot"] == "b"
    assert client.conn is conn
    client.close()
    with pytest.raises(RouterRunning) as info:
        await start_router(router.sock, tmp_path / "other.log")
    assert info.value.pid == router.pid


async def test_sigterm_finishes_in_flight_requests(
    router: Router, services: list[Service]
) -> None:
    """SIGTERM lets a request in flight finish, refuses new connections, and the router exits."""
    a = Service("a")
    services.append(a)
    st = await router.client.configure(cfg(up("a", a, 1)))
    client = Http(st.port)
    slow = asyncio.create_task(client.request(path="/slow?s=0.8"))
    await wait_stats(router, lambda s: True)  # the request is on its way
    await asyncio.sleep(0.2)  # let the request reach the upstream before the signal
    os.kill(router.pid, signal.SIGTERM)
    status, hdrs, _ = await slow
    client.close()
    assert status == 200 and hdrs["connection"] == "close"
    assert await asyncio.to_thread(_wait_gone, router.pid)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", st.port)
