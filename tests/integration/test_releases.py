"""Releases end to end with a real nats-server: push/list via the CLI, resolve, the agent cache,
a corrupted object, and the example ``hello`` service as a real process over real HTTP."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import sys
import tarfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from nats.js import api as js_api
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE

from agent.errors import ReleaseError
from agent.host.releases import ReleaseCache
from coordinator.dev import examples
from coordinator.dev.broker import Broker, free_port
from coordinator.releases import (
    ReleaseExists,
    UnknownRelease,
    list_releases,
    push_release,
    resolve_release,
)
from protocol import direct, subjects
from protocol.bundle import digest, pack
from protocol.bus import Bus
from protocol.errors import BusError
from protocol.messages import ReleaseRef
from tests.integration.procs import hello_bundle

REPO = Path(__file__).resolve().parents[2]
FLEETWAVE = Path(sys.executable).parent / "fleetwave"
FLEET = "t"


@dataclass
class Run:
    code: int
    out: str
    err: str


async def cli(broker: Broker, *args: str, timeout: float = 60) -> Run:
    """Run the real ``fleetwave`` CLI in a subprocess against the broker."""
    proc = await asyncio.create_subprocess_exec(
        str(FLEETWAVE), "--nats", broker.url, "--fleet", FLEET, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def bus(broker: Broker) -> AsyncIterator[Bus]:
    b = await Bus.connect(broker.url, FLEET)
    try:
        yield b
    finally:
        await b.close()


def copy_bundle(version: str, dest: Path) -> Path:
    shutil.copytree(hello_bundle(version), dest)
    return dest


# -- push / list / resolve -------------------------------------------------------------------------


async def test_push_list_repush_and_refuse_changed_content(broker: Broker, tmp_path: Path) -> None:
    """push stores both versions, list shows them, a re-push is a no-op, changed content refused."""
    for version in ("1.0.0", "2.0.0"):
        run = await cli(broker, "release", "push", str(hello_bundle(version)))
        assert run.code == 0, run.err
        assert run.out.startswith(f"pushed hello {version} (sha256:")

    run = await cli(broker, "release", "list", "-o", "json")
    assert run.code == 0, run.err
    rows = json.loads(run.out)
    assert [(r["service"], r["version"]) for r in rows] == [("hello", "1.0.0"), ("hello", "2.0.0")]
    for r in rows:
        assert r["digest"] == digest(pack(hello_bundle(r["version"]))[0])
        assert r["port"] == 8080 and r["size"] > 0 and r["pushed_at"] > 0

    run = await cli(broker, "release", "list", "hello")
    assert run.code == 0 and "hello    1.0.0" in run.out and "2.0.0" in run.out
    run = await cli(broker, "release", "list", "other")
    assert run.code == 0 and "no releases of other" in run.out

    again = await cli(broker, "release", "push", str(hello_bundle("1.0.0")))
    assert again.code == 0 and "already present" in again.out

    changed = copy_bundle("1.0.0", tmp_path / "changed")
    (changed / "app.py").write_text((changed / "app.py").read_text() + "\n# changed\n")
    refused = await cli(broker, "release", "push", str(changed))
    assert refused.code == 1
    assert refused.out == ""
    assert refused.err.count("\n") == 1
    assert "already exists with digest" in refused.err and "bump the version" in refused.err
    assert "Traceback" not in refused.err

    rows_after = json.loads((await cli(broker, "release", "list", "-o", "json")).out)
    assert rows_after == rows  # the refused push changed nothing


async def test_push_refuses_bad_bundles_with_one_line(broker: Broker, tmp_path: Path) -> None:
    """A hostile tarball or a bad manifest exits 2 with one line, and nothing is stored."""
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        manifest = (hello_bundle("1.0.0") / "fleetwave.toml").read_bytes()
        for name, data in (("fleetwave.toml", manifest),
                           ("../../etc/cron.d/x", b"* * * * * root true\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    bad = copy_bundle("1.0.0", tmp_path / "bad")
    (bad / "fleetwave.toml").write_text((bad / "fleetwave.toml").read_text() + "colour = 1\n")
    for path, reason in ((evil, "'..' component"), (bad, "unknown key 'stop.colour'")):
        run = await cli(broker, "release", "push", str(path))
        assert run.code == 2, run
        assert reason in run.err and run.err.count("\n") == 1 and "Traceback" not in run.err
    run = await cli(broker, "release", "list", "-o", "json")  # refused before creating anything
    assert run.code == 0 and json.loads(run.out) == [], run


async def test_list_on_a_fresh_fleet_says_no_releases(broker: Broker) -> None:
    """On a fleet where nothing was pushed yet (no index bucket), list says "no releases"."""
    run = await cli(broker, "release", "list")
    assert (run.code, run.out, run.err) == (0, "no releases in this fleet\n", ""), run
    run = await cli(broker, "release", "list", "hello", "-o", "json")
    assert (run.code, run.out) == (0, "[]\n"), run


async def test_tarball_push_equals_directory_push(broker: Broker, tmp_path: Path) -> None:
    """Pushing a .tar.gz of a pushed directory is 'already present' (same canonical digest)."""
    assert (await cli(broker, "release", "push", str(hello_bundle("2.0.0")))).code == 0
    tgz = tmp_path / "hello-2.0.0.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(hello_bundle("2.0.0"), arcname="hello-2.0.0-root-is-renamed", filter=None)
    # a tarball whose files sit under a top directory is not a bundle: the manifest is not at root
    run = await cli(broker, "release", "push", str(tgz))
    assert run.code == 2 and "no fleetwave.toml at the root" in run.err
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(hello_bundle("2.0.0"), arcname=".")
    run = await cli(broker, "release", "push", str(tgz), "-o", "json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["status"] == "already present"


async def test_cli_without_nats_says_so(tmp_path: Path) -> None:
    """With no NATS server, list fails with one line saying how to start one."""
    proc = await asyncio.create_subprocess_exec(
        str(FLEETWAVE), "--nats", f"nats://127.0.0.1:{free_port()}", "release", "list",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    assert err.decode().count("\n") == 1 and "cannot reach NATS" in err.decode()


async def test_resolve_and_list_api(bus: Bus) -> None:
    """resolve_release returns the pushed ref; an unknown version names the known ones."""
    r1 = await push_release(bus, hello_bundle("1.0.0"))
    await push_release(bus, hello_bundle("2.1.0"))
    assert r1.status == "pushed"
    ref = await resolve_release(bus, "hello", "1.0.0")
    assert ref == r1.info.ref
    assert ref.digest == digest(pack(hello_bundle("1.0.0"))[0])
    with pytest.raises(UnknownRelease, match=r"no release hello 9\.9 .*known: 1\.0\.0, 2\.1\.0"):
        await resolve_release(bus, "hello", "9.9")
    assert [r.version for r in await list_releases(bus, "hello")] == ["1.0.0", "2.1.0"]
    assert await list_releases(bus, "nothing") == []


async def test_concurrent_pushes_of_one_version_with_different_content(
    bus: Bus, tmp_path: Path
) -> None:
    """Two bundles pushed as one version at once: exactly one wins, the other is refused."""
    a = copy_bundle("2.0.0", tmp_path / "a")
    b = copy_bundle("2.0.0", tmp_path / "b")
    (b / "extra.txt").write_text("b")
    results = await asyncio.gather(
        push_release(bus, a), push_release(bus, b), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["PushResult", "ReleaseExists"]
    winner = next(r for r in results if not isinstance(r, BaseException))
    ref = await resolve_release(bus, "hello", "2.0.0")
    assert ref.digest == winner.info.digest  # type: ignore[union-attr]
    stored = bytearray()
    found = await bus.obj_get_into(subjects.releases_store(FLEET), "hello/2.0.0", stored.extend)
    assert found and digest(bytes(stored)) == ref.digest


# -- the agent cache against the real object store -------------------------------------------------


async def test_cache_fetches_verifies_and_refuses_corrupt_object(
    bus: Bus, tmp_path: Path
) -> None:
    """ensure() fetches and unpacks a pushed release once; a corrupted object is refused by digest,
    and pushing the same bundle again repairs it."""
    r1 = await push_release(bus, hello_bundle("1.0.0"))
    r2 = await push_release(bus, hello_bundle("2.0.0"))
    cache = ReleaseCache(tmp_path / "releases")
    path = await cache.ensure(bus, FLEET, r1.info.ref)
    assert (path / "app.py").read_bytes() == (hello_bundle("1.0.0") / "app.py").read_bytes()
    assert await cache.ensure(bus, FLEET, r1.info.ref) == path
    assert cache.fetches == 1

    wrong = pack(hello_bundle("2.1.0"))[0]
    await bus.obj_put(subjects.releases_store(FLEET), "hello/2.0.0", wrong)
    with pytest.raises(ReleaseError, match="refused") as info:
        await cache.ensure(bus, FLEET, r2.info.ref)
    assert "expected " + r2.info.digest[:19] in info.value.reason
    assert cache.path_for(r2.info.ref) is None
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == [path.name]

    repaired = await push_release(bus, hello_bundle("2.0.0"))
    assert repaired.status == "repaired"
    assert (await push_release(bus, hello_bundle("2.0.0"))).status == "already present"
    path2 = await cache.ensure(bus, FLEET, r2.info.ref)
    assert "2.0.0" in (path2 / "fleetwave.toml").read_text()


async def test_missing_object_is_unknown_to_resolve(bus: Bus) -> None:
    """A record whose bundle vanished from the store cannot be resolved; a re-push repairs it."""
    await push_release(bus, hello_bundle("1.0.0"))
    obs = await bus.js.object_store(subjects.releases_store(FLEET))
    await obs.delete("hello/1.0.0")
    with pytest.raises(UnknownRelease, match="missing from the store"):
        await resolve_release(bus, "hello", "1.0.0")
    assert (await push_release(bus, hello_bundle("1.0.0"))).status == "repaired"
    assert (await resolve_release(bus, "hello", "1.0.0")).version == "1.0.0"


async def test_push_of_other_content_is_refused_by_the_api(bus: Bus, tmp_path: Path) -> None:
    """push_release raises ReleaseExists for a known version with other content."""
    await push_release(bus, hello_bundle("1.0.0"))
    changed = copy_bundle("1.0.0", tmp_path / "c")
    (changed / "more.txt").write_text("x")
    with pytest.raises(ReleaseExists, match="bump the version"):
        await push_release(bus, changed)


# -- the example service as a real process -------------------------------------------------------


@dataclass
class App:
    proc: asyncio.subprocess.Process
    port: int


@pytest.fixture
async def start_app() -> AsyncIterator[object]:
    apps: list[App] = []

    async def start(version: str = "1.0.0", **env: str) -> App:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "app.py", cwd=hello_bundle(version),
            env={**os.environ, "PORT": str(port), "FLEETWAVE_VERSION": version,
                 "FLEETWAVE_NODE": "node-7", "FLEETWAVE_SLOT": "b", **env},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        app = App(proc, port)
        apps.append(app)
        async with asyncio.timeout(10):
            while True:
                try:
                    status, _, _ = await http(port, "GET", "/healthz")
                    if status in (200, 503):
                        return app
                except OSError:
                    if proc.returncode is not None:
                        raise AssertionError(f"app exited with {proc.returncode}") from None
                    await asyncio.sleep(0.02)

    yield start
    for app in apps:
        if app.proc.returncode is None:
            app.proc.kill()
        await app.proc.wait()


async def http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str],
                                                                               bytes]:
    """One HTTP/1.1 request on a new connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await exchange(reader, writer, method, path, body)
    finally:
        writer.close()
        await writer.wait_closed()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    async with asyncio.timeout(10):
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        data = b""
        if method != "HEAD":
            data = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, data


async def test_app_answers_with_identity_and_keeps_connections_alive(start_app: object) -> None:
    """GET / is JSON with version, node and slot; two requests share one keep-alive connection."""
    app = await start_app()  # type: ignore[operator]
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        s1, h1, b1 = await exchange(reader, writer, "GET", "/")
        s2, _, b2 = await exchange(reader, writer, "GET", "/healthz")
        s3, _, b3 = await exchange(reader, writer, "POST", "/echo", b"ping")
    finally:
        writer.close()
        await writer.wait_closed()
    assert (s1, s2, s3) == (200, 200, 200)
    doc = json.loads(b1)
    assert doc["version"] == "1.0.0" and doc["node"] == "node-7" and doc["slot"] == "b"
    assert doc["greeting"] == "hello"  # GREETING comes from the manifest env, unset here
    assert h1["content-type"] == "application/json"
    assert b2 == b"ok\n" and b3 == b"ping"
    assert (await http(app.port, "GET", "/nope"))[0] == 404


async def test_error_rate_knob_fails_exactly_that_share(start_app: object) -> None:
    """ERROR_RATE=0.5 answers exactly every other GET / with 500; health still passes."""
    app = await start_app(ERROR_RATE="0.5")  # type: ignore[operator]
    statuses = [(await http(app.port, "GET", "/"))[0] for _ in range(20)]
    assert statuses == [200, 500] * 10
    assert (await http(app.port, "GET", "/healthz"))[0] == 200


async def test_health_fail_and_latency_knobs(start_app: object) -> None:
    """HEALTH_FAIL=1 makes /healthz 503; EXTRA_LATENCY_MS delays GET / by at least that much."""
    app = await start_app(HEALTH_FAIL="1", EXTRA_LATENCY_MS="150")  # type: ignore[operator]
    assert (await http(app.port, "GET", "/healthz"))[0] == 503
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert (await http(app.port, "GET", "/"))[0] == 200
    assert loop.time() - t0 >= 0.15  # a lower bound: the knob works (not a speed assertion)


async def test_health_fail_on_node_knob_fails_only_that_node(start_app: object) -> None:
    """HEALTH_FAIL_ON_NODE fails /healthz only where FLEETWAVE_NODE names that node."""
    bad = await start_app(HEALTH_FAIL_ON_NODE="node-7")  # type: ignore[operator]
    good = await start_app(HEALTH_FAIL_ON_NODE="node-2")  # type: ignore[operator]
    assert (await http(bad.port, "GET", "/healthz"))[0] == 503
    assert (await http(good.port, "GET", "/healthz"))[0] == 200


async def test_smoke_mode_checks_the_version_it_serves(start_app: object) -> None:
    """``app.py --smoke`` (a validate hook) exits 0 against its own version, 1 otherwise."""
    app = await start_app("1.0.0")  # type: ignore[operator]

    async def smoke(version: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "app.py", "--smoke", cwd=hello_bundle("1.0.0"),
            env={**os.environ, "PORT": str(app.port), "FLEETWAVE_VERSION": version},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(10):
            return await proc.wait()

    assert await smoke("1.0.0") == 0
    assert await smoke("9.9.9") == 1


async def test_crash_after_exits_with_status_3(start_app: object) -> None:
    """CRASH_AFTER_S makes the process exit with status 3 after that many seconds."""
    app = await start_app(CRASH_AFTER_S="0.5")  # type: ignore[operator]
    async with asyncio.timeout(10):
        assert await app.proc.wait() == 3


async def test_sigterm_finishes_in_flight_request_then_exits_0(start_app: object) -> None:
    """On SIGTERM a request in flight is answered (with Connection: close), then exit 0."""
    app = await start_app(EXTRA_LATENCY_MS="500")  # type: ignore[operator]
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        assert (await exchange(reader, writer, "GET", "/healthz"))[0] == 200
        assert (await exchange(idle_reader, idle_writer, "GET", "/healthz"))[0] == 200
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        app.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            rest = await reader.read()  # until the server closes the connection
            idle_eof = await idle_reader.read()  # the idle keep-alive connection is closed
            code = await app.proc.wait()
    finally:
        for w in (writer, idle_writer):
            w.close()
    assert status_line.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in rest.lower() and b'"version": "1.0.0"' in rest
    assert idle_eof == b""
    assert code == 0


def _hello_module() -> ModuleType:
    """The example's app.py, imported in this process (to drive its server thread by thread)."""
    spec = importlib.util.spec_from_file_location("hello_app",
                                                  examples.examples_root() / "hello" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sent", ["pipelined", "after the answer"])
def test_a_request_waiting_when_stopping_begins_is_answered_not_dropped(sent: str) -> None:
    """SIGTERM between a keep-alive answer (which did not say "Connection: close") and the
    handler's next read: the client may already have sent its next request. It is answered,
    with "Connection: close", then the connection ends. Before, the handler closed the
    connection at once and the request was lost (test_sigterm_finishes_in_flight_request_then_
    exits_0 failed so once under load). ``sent``: the second request in the first one's write
    (the handler's buffer holds it) or written after the first answer arrived (the socket
    does)."""
    hello = _hello_module()
    server = hello.Server(("127.0.0.1", 0), hello.Knobs({"FLEETWAVE_VERSION": "1.0.0"}))
    second_sent = threading.Event()

    class SignalledAfterFirstAnswer(hello.Handler):  # type: ignore[name-defined,misc]
        def do_GET(self) -> None:
            super().do_GET()
            if self.path == "/healthz":  # answered; the signal comes before the next read
                self.wfile.flush()
                assert second_sent.wait(5)
                self.server.close_idle()  # what main() does on SIGTERM

    server.RequestHandlerClass = SignalledAfterFirstAnswer
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with socket.create_connection(server.server_address, timeout=5) as conn:
            if sent == "pipelined":
                conn.sendall(first + second)
            else:
                conn.sendall(first)
                got = b""
                while b"ok\n" not in got:
                    got += conn.recv(4096)
                conn.sendall(second)
            second_sent.set()
            answers = b""
            while chunk := conn.recv(4096):  # until the server ends the connection
                answers += chunk
    finally:
        second_sent.set()
        server.shutdown()
        loop.join(5)
        server.server_close()
    if sent == "pipelined":
        assert answers.count(b"HTTP/1.1 200") == 2, answers
    else:
        assert answers.startswith(b"HTTP/1.1 200"), answers
    assert b'"version": "1.0.0"' in answers and b"connection: close" in answers.lower()


def test_one_app_and_a_manifest_per_version_make_valid_bundles() -> None:
    """The hello example is one app.py and a fleetwave.toml per version; each assembled bundle
    carries that app and packs into a valid bundle."""
    root = examples.examples_root() / "hello"
    versions = examples.versions()
    assert versions == ["1.0.0", "2.0.0", "2.1.0", "2.2.0", "2.3.0", "2.4.0", "2.5.0", "2.9.0"]
    assert not any((root / v / "app.py").exists() for v in versions)  # one copy, not eight
    for v in versions:
        assert (hello_bundle(v) / "app.py").read_bytes() == (root / "app.py").read_bytes()
        _, manifest = pack(hello_bundle(v))
        assert (manifest.name, manifest.version, manifest.port) == ("hello", v, 8080)
        health = manifest.health
        assert (health.http, health.interval, health.start_interval) == ("/healthz", 1.0, 0.2)
        assert manifest.health.start_timeout == 10 and manifest.stop.drain == 0.5
    assert pack(hello_bundle("2.1.0"))[1].env["HEALTH_FAIL"] == "1"
    assert pack(hello_bundle("2.2.0"))[1].env["ERROR_RATE"] == "0.5"
    assert pack(hello_bundle("2.3.0"))[1].env["EXTRA_LATENCY_MS"] == "200"
    m24 = pack(hello_bundle("2.4.0"))[1]
    assert m24.env["HEALTH_FAIL_ON_NODE"] == "node-2"
    assert m24.hooks.validate == ["python3", "app.py", "--smoke"]


# -- the agent's download is streamed and bounded --------------------------------------------------


async def test_object_above_its_declared_size_stops_and_no_fetch_makes_a_consumer(
    bus: Bus, tmp_path: Path
) -> None:
    """An object longer than the ref declares is refused mid-transfer from the real store; a
    multi-chunk object is fetched intact; neither transfer makes a consumer on the server (the
    chunks come in batches of direct gets: ``protocol.direct``), which, when a release of
    several chunks goes to 20,000 nodes at once, was 20,000 consumers asked for at once."""
    big = copy_bundle("1.0.0", tmp_path / "big")
    (big / "noise.bin").write_bytes(os.urandom(600_000))  # several object-store chunks
    pushed = await push_release(bus, big)
    stream = f"OBJ_{subjects.releases_store(FLEET)}"
    store = await bus.js.object_store(subjects.releases_store(FLEET))
    assert (await store.get_info("hello/1.0.0")).chunks > 1  # what this test is about

    async def consumers() -> int:
        return (await bus.js.stream_info(stream)).state.consumer_count

    short = ReleaseRef(service="hello", version="1.0.0", digest=pushed.info.digest, size=200_000)
    cache = ReleaseCache(tmp_path / "releases")
    with pytest.raises(ReleaseError, match="larger than its declared 200000 bytes") as info:
        await cache.ensure(bus, FLEET, short)
    assert not info.value.transient
    assert list((tmp_path / "releases").iterdir()) == []
    assert await consumers() == 0

    path = await cache.ensure(bus, FLEET, pushed.info.ref)
    assert (path / "noise.bin").read_bytes() == (big / "noise.bin").read_bytes()
    assert await consumers() == 0


async def test_direct_reads_ask_again_past_a_batchs_bytes_and_name_what_is_missing(
    bus: Bus, tmp_path: Path
) -> None:
    """``direct.read_subject`` on the real server: batches bounded by bytes are asked for again
    from the last sequence received until every chunk is read, in order; a subject with fewer
    messages than asked, or none, fails in one line; the stream's own bytes are untouched."""
    store = subjects.releases_store(FLEET)
    stream = subjects.object_stream(store)
    await bus.ensure_fleet(1)
    obs = await bus.js.object_store(store)
    data = os.urandom(10_000)
    await bus.obj_put(store, "other", b"interleaved")  # the subject's sequences are not 1, 2, ..
    await obs.put("x", data, meta=js_api.ObjectMeta(
        name="x", options=js_api.ObjectMetaOptions(max_chunk_size=1000)))
    info = await obs.get_info("x")
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=store, obj=info.nuid)
    asked: list[bytes] = []
    real_publish = bus.nc.publish

    async def publish(subj: str, payload: bytes = b"", **kw: object) -> None:
        if subj.startswith("$JS.API.DIRECT.GET."):
            asked.append(payload)
        await real_publish(subj, payload, **kw)  # type: ignore[arg-type]

    bus.nc.publish = publish  # type: ignore[method-assign]
    try:
        got: list[bytes] = []
        await direct.read_subject(bus.nc, stream, subject, 10, got.append, batch_bytes=2500)
        assert b"".join(got) == data and len(got) == 10
        assert len(asked) == 4  # 3 chunks a batch (the server stops past 2,500 bytes), then 1
        assert [json.loads(a)["batch"] for a in asked] == [10, 7, 4, 1]
        with pytest.raises(BusError, match="only 10 of its 12 chunks are stored"):
            await direct.read_subject(bus.nc, stream, subject, 12, lambda _: None)
        with pytest.raises(BusError, match="only 0 of its 1 chunks are stored"):
            await direct.read_subject(bus.nc, stream, subject + "x", 1, lambda _: None)
    finally:
        bus.nc.publish = real_publish  # type: ignore[method-assign]
    assert await bus.obj_get_into(store, "x", got.append)


async def test_a_one_chunk_release_is_fetched_without_a_consumer(bus: Bus, tmp_path: Path) -> None:
    """A bundle of one object-store chunk (most services' code) is read with message gets: no
    consumer is made on the server for it (when a release reaches 50,000 nodes, that is 50,000
    consumers made and removed), and it arrives intact. A missing object, or a fleet with no
    store at all, is "not in the fleet's object store"."""
    pushed = await push_release(bus, hello_bundle("1.0.0"))
    stream = f"OBJ_{subjects.releases_store(FLEET)}"
    store = await bus.js.object_store(subjects.releases_store(FLEET))
    assert (await store.get_info("hello/1.0.0")).chunks == 1  # what this test is about
    before = (await bus.js.stream_info(stream)).state.consumer_count
    cache = ReleaseCache(tmp_path / "releases")
    path = await cache.ensure(bus, FLEET, pushed.info.ref)
    assert (path / "app.py").read_bytes() == (hello_bundle("1.0.0") / "app.py").read_bytes()
    assert (await bus.js.stream_info(stream)).state.consumer_count == before == 0
    missing = ReleaseRef(service="hello", version="9.9.9", digest="sha256:" + "0" * 64, size=0)
    with pytest.raises(ReleaseError, match="not in the fleet's object store"):
        await cache.ensure(bus, FLEET, missing)
    with pytest.raises(ReleaseError, match="not in the fleet's object store"):
        await ReleaseCache(tmp_path / "other").ensure(bus, "nosuchfleet", pushed.info.ref)
