"""The agent's service manager end to end: a real broker, a real agent process, the hello bundles
pushed as releases, real HTTP traffic through the router under steady load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from agent.host.ports import claims_dir
from agent.manager.routing import router_socket
from agent.manager.service import ROUTER_FAILS_AFTER
from coordinator.dev.broker import Broker, free_port
from coordinator.releases import push_release
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.messages import DesiredState, Event, Heartbeat, ObservedState, ReleaseRef
from protocol.signing import generate_seed, public_key, sign
from tests.integration.procs import hello_bundle, reaping, spawn_agent, wait_until

NODE = "n1"


# -- load: fresh and keep-alive connections -------------------------------------------------------


@dataclass
class Load:
    """Steady GET / traffic on one port; every request that is not a 200 counts as failed."""

    port: int
    host: str = "127.0.0.1"
    ok: int = 0
    failed: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: bool
    ) -> None:
        conn = "keep-alive" if keep else "close"
        writer.write(f"GET / HTTP/1.1\r\nHost: t\r\nConnection: {conn}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        if status != 200:
            raise OSError(f"status {status}: {body[:100]!r}")
        version = json.loads(body).get("version", "?")
        self.versions[version] = self.versions.get(version, 0) + 1

    async def _fresh(self) -> None:
        while not self._stop.is_set():
            writer = None
            try:
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                    await self._request(reader, writer, keep=False)
                self.ok += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                self._fail(f"fresh: {exc!r}")
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            await asyncio.sleep(0.005)

    async def _keepalive(self) -> None:
        reader = writer = None
        while not self._stop.is_set():
            try:
                async with asyncio.timeout(5):
                    if writer is None:
                        reader, writer = await asyncio.open_connection(self.host, self.port)
                    assert reader is not None
                    await self._request(reader, writer, keep=True)
                self.ok += 1
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self._fail(f"keep-alive: cut mid-answer {exc!r}")
                # else: the server closed an idle keep-alive connection between requests, which
                # HTTP allows; a client retries such a request on a new connection.
                writer = None
            except (OSError, TimeoutError, ValueError) as exc:
                self._fail(f"keep-alive: {exc!r}")
                writer = None
            await asyncio.sleep(0.005)
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _fail(self, what: str) -> None:
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(what)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._fresh()), asyncio.create_task(self._keepalive())]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)


# -- fixtures -------------------------------------------------------------------------------------


@dataclass
class Fleet:
    bus: Bus
    seed: bytes
    port: int
    base: Path
    refs: dict[str, ReleaseRef]
    generation: int = 0

    async def desire(
        self,
        slots: dict[str, str],
        weights: dict[str, int],
        *,
        seed: bytes | None = None,
        generation: int | None = None,
    ) -> int:
        gen = generation if generation is not None else self.generation + 1
        self.generation = max(self.generation, gen)
        d = DesiredState(
            fleet="default",
            node=NODE,
            service="hello",
            generation=gen,
            slots={s: self.refs[v] for s, v in slots.items()},
            weights=weights,
        )
        env = sign(seed or self.seed, d)
        await self.bus.kv_put(
            subjects.desired_bucket("default"),
            subjects.node_service_key(NODE, "hello"),
            encode(env),
        )
        return gen

    async def observed(self) -> ObservedState | None:
        e = await self.bus.kv_get(
            subjects.observed_bucket("default"), subjects.node_service_key(NODE, "hello")
        )
        return decode(ObservedState, e.value) if e and e.value else None

    async def converged(self, gen: int, timeout: float = 40) -> ObservedState:
        obs = await wait_until(
            self.observed,
            lambda o: o is not None and o.observed_generation >= gen,
            timeout=timeout,
            what=f"observed generation {gen}",
        )
        assert obs is not None
        return obs


def _bundle(src: Path, dest: Path, port: int) -> Path:
    """A copy of a hello bundle whose router port is ``port`` (tests must not share 8080)."""
    shutil.copytree(src, dest)
    m = dest / "fleetwave.toml"
    m.write_text(m.read_text().replace("port = 8080", f"port = {port}"))
    return dest


def _leftovers(base: Path) -> list[psutil.Process]:
    """Slot processes and routers the agent started under ``base`` (they outlive the agent)."""
    found = []
    sock = str(router_socket(base / "agents" / NODE, "hello"))
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            cwd = p.info["cwd"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if (str(base) in cmd or cwd.startswith(str(base)) or sock in cmd
                or _environ(p).get("FLEETWAVE_RELEASE_DIR", "").startswith(str(base))):
            found.append(p)  # (the last: a slot that chdir'd away, its argv naming nothing)
    return found


@pytest.fixture
async def fleet(broker: Broker, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with hello_fleet(broker, tmp_path) as f:
        yield f


@contextlib.asynccontextmanager
async def hello_fleet(broker: Broker, base: Path) -> AsyncIterator[Fleet]:
    """The hello releases pushed, agents' data under ``base``; every process they left, killed."""
    bus = await Bus.connect(broker.url, "default")
    await bus.ensure_fleet()
    port = free_port()
    refs = {}
    for version in ("1.0.0", "2.0.0", "2.1.0"):
        path = _bundle(hello_bundle(version), base / "bundles" / version, port)
        refs[version] = (await push_release(bus, path)).info.ref
    try:
        yield Fleet(bus=bus, seed=generate_seed(), port=port, base=base / "agents", refs=refs)
    finally:
        await bus.close()
        procs = _leftovers(base)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=5)
        _remove_socket_dir(base)


def _remove_socket_dir(base: Path) -> None:
    """A data dir too long for a unix socket puts it in the temp dir: clean that up too."""
    sock = router_socket(base / "agents" / NODE, "hello")
    if not sock.is_relative_to(base):
        shutil.rmtree(sock.parent, ignore_errors=True)


def _agent(f: Fleet, broker: Broker):  # type: ignore[no-untyped-def]
    return spawn_agent(broker.url, NODE, f.base, extra=["--trust-key", public_key(f.seed)])


async def _events(bus: Bus, kind: str) -> list[Event]:
    out = []
    async for data in bus.stream_messages(
        subjects.events_stream("default"), subjects.agent_events("default", NODE, kind)
    ):
        out.append(decode(Event, data))
    return out


# -- tests ----------------------------------------------------------------------------------------


async def test_make_before_break_loses_no_request(fleet: Fleet, broker: Broker) -> None:
    """1.0.0 → 2.0.0 under steady load (fresh and keep-alive): zero failed requests."""
    async with reaping(_agent(fleet, broker)):
        gen = await fleet.desire({"a": "1.0.0"}, {"a": 100})
        obs = await fleet.converged(gen)
        assert obs.phase == "converged" and obs.slots["a"].status == "healthy"
        async with Load(fleet.port).running() as load:
            await wait_until(_const(load), lambda ld: ld.ok > 50, timeout=20, what="load")
            gen = await fleet.desire({"b": "2.0.0"}, {"b": 100})
            obs = await fleet.converged(gen)
            before = load.versions.get("2.0.0", 0)
            await wait_until(
                _const(load),
                lambda ld: ld.versions.get("2.0.0", 0) > before + 50,
                timeout=20,
                what="traffic on 2.0.0",
            )
        assert load.failed == 0, load.errors
        assert load.versions.get("1.0.0", 0) > 0 and load.versions.get("2.0.0", 0) > 0
        assert obs.phase == "converged"
        assert obs.slots["b"].status == "healthy" and obs.slots["b"].version == "2.0.0"
        assert obs.slots["a"].status == "stopped"
        assert obs.weights == {"b": 100}
        kinds = {e.kind for e in await _events(fleet.bus, "slot.>")}
        assert {"slot.started", "slot.healthy", "slot.stopped"} <= kinds
        beat = await _heartbeat(fleet.bus)
        assert [
            (x.service, x.version, x.healthy, x.observed_generation) for x in beat.services
        ] == [("hello", "2.0.0", True, gen)]
        procs = {p.slot: p for p in beat.slots}
        assert set(procs) == {"b"} and procs["b"].rss > 0 and procs["b"].pid == obs.slots["b"].pid


async def test_slot_ports_are_claimed_for_the_host_and_freed_at_stop(
    fleet: Fleet, broker: Broker
) -> None:
    """Each running slot's port is claimed in the host's claims directory, in the agent's name
    (so no other agent of the host picks it before the slot binds, nor while it restarts:
    agent.host.ports); the claim goes when the slot stops."""
    claims = claims_dir()
    async with reaping(_agent(fleet, broker)) as (agent,):

        def mine(port: int | None) -> list[str]:
            claim = claims / str(port)
            held = str(claim.readlink()) if claim.is_symlink() else ""
            return [held] if held.split("-")[0] == str(agent.pid) else []

        gen = await fleet.desire({"a": "1.0.0"}, {"a": 100})
        obs = await fleet.converged(gen)
        port_a = obs.slots["a"].port
        assert port_a is not None and len(mine(port_a)) == 1
        gen = await fleet.desire({"b": "2.0.0"}, {"b": 100})
        obs = await wait_until(fleet.observed,
                               lambda o: o is not None and o.observed_generation >= gen
                               and o.slots["a"].status == "stopped",
                               timeout=40, what="slot a stopped")
        assert obs is not None and obs.slots["b"].port is not None
        assert mine(port_a) == []
        assert len(mine(obs.slots["b"].port)) == 1


async def _heartbeat(bus: Bus) -> Heartbeat:
    """The next heartbeat of the node that reports a slot process."""
    got: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_beat(subject: str, data: bytes) -> None:
        hb = decode(Heartbeat, data)
        if hb.slots:
            got.put_nowait(hb)

    sub = await bus.subscribe(subjects.heartbeat("default", NODE), on_beat)
    try:
        return await asyncio.wait_for(got.get(), 10)
    finally:
        await sub.unsubscribe()


async def test_release_that_never_gets_healthy_fails_and_old_keeps_serving(
    fleet: Fleet, broker: Broker
) -> None:
    """hello 2.1.0 never passes its health check: failed with the reason, 1.0.0 serves on."""
    async with reaping(_agent(fleet, broker)):
        gen = await fleet.desire({"a": "1.0.0"}, {"a": 100})
        await fleet.converged(gen)
        async with Load(fleet.port).running() as load:
            gen = await fleet.desire({"b": "2.1.0"}, {"b": 100})
            obs = await wait_until(
                fleet.observed,
                lambda o: o is not None and o.phase == "failed",
                timeout=40,
                what="phase failed",
            )
            await wait_until(_const(load), lambda ld: ld.ok > 50, timeout=20, what="load")
        assert obs is not None
        assert load.failed == 0, load.errors
        assert set(load.versions) == {"1.0.0"}
        assert obs.generation == gen and obs.observed_generation == gen - 1
        assert "start_timeout" in obs.error and "2.1.0" in obs.error
        assert obs.slots["b"].status == "failed"
        assert obs.slots["a"].status == "healthy"
        failed = await _events(fleet.bus, "slot.failed")
        assert any("start_timeout" in e.message for e in failed)


async def test_a_public_port_taken_by_another_process_fails_with_the_reason(
    fleet: Fleet, broker: Broker
) -> None:
    """Another process holds the service's public port: the router cannot listen, and after
    ROUTER_FAILS_AFTER the observed state says failed with that reason (a rollout learns it at
    once instead of at its progress deadline)."""
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", fleet.port))
    squatter.listen()
    try:
        async with reaping(_agent(fleet, broker)):
            gen = await fleet.desire({"a": "1.0.0"}, {"a": 100})
            obs = await wait_until(
                fleet.observed,
                lambda o: o is not None and o.phase == "failed",
                timeout=ROUTER_FAILS_AFTER + 30,
                what="phase failed",
            )
    finally:
        squatter.close()
    assert obs is not None and obs.generation == gen
    assert "router:" in obs.error and "cannot listen" in obs.error, obs.error


async def test_forged_and_replayed_states_are_refused(fleet: Fleet, broker: Broker) -> None:
    """A wrong key, an older generation and garbage are refused (agent.refused), nothing changes."""
    async with reaping(_agent(fleet, broker)):
        gen = await fleet.desire({"a": "1.0.0"}, {"a": 100}, generation=5)
        await fleet.converged(gen)
        await fleet.desire({"b": "2.0.0"}, {"b": 100}, seed=generate_seed(), generation=6)
        await fleet.desire({"b": "2.0.0"}, {"b": 100}, generation=4)
        await fleet.bus.kv_put(
            subjects.desired_bucket("default"),
            subjects.node_service_key(NODE, "hello"),
            b'{"not": "an envelope"',
        )
        refused = await wait_until(
            lambda: _events(fleet.bus, "agent.refused"),
            lambda evs: len(evs) >= 3,
            timeout=20,
            what="three agent.refused events",
        )
        reasons = " | ".join(e.message for e in refused)
        assert "unknown key" in reasons and "not newer than 5" in reasons
        assert "malformed desired state" in reasons
        obs = await fleet.observed()
        assert obs is not None
        assert obs.generation == 5 and obs.observed_generation == 5
        assert set(obs.slots) == {"a"} and obs.weights == {"a": 100}


async def test_crash_loop_ends_failed_and_agent_stays_up(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    """A service that keeps crashing ends failed with its last exit status; the agent lives."""
    src = _bundle(hello_bundle("1.0.0"), tmp_path / "crashy", fleet.port)
    m = src / "fleetwave.toml"
    m.write_text(
        m.read_text()
        .replace('version = "1.0.0"', 'version = "9.9.9"')
        .replace('GREETING = "hello from 1.0.0"', 'GREETING = "crashy", CRASH_AFTER_S = "0.2"')
        .replace('start_timeout = "10s"', 'start_timeout = "60s"')
    )
    fleet.refs["9.9.9"] = (await push_release(fleet.bus, src)).info.ref
    async with reaping(_agent(fleet, broker)) as (agent,):
        await fleet.desire({"a": "9.9.9"}, {"a": 100})
        obs = await wait_until(
            fleet.observed,
            lambda o: o is not None and o.phase == "failed",
            timeout=60,
            what="crash loop detected",
        )
        assert obs is not None
        assert "crash loop" in obs.error and "exited with status 3" in obs.error
        assert obs.slots["a"].last_exit == 3
        assert agent.running


async def test_kill_9_of_the_agent_loses_nothing_and_adopts(fleet: Fleet, broker: Broker) -> None:
    """kill -9 of the agent under load: zero failures; the new agent adopts, no second process."""
    agent = _agent(fleet, broker)
    async with reaping(agent):
        gen = await fleet.desire({"a": "1.0.0"}, {"a": 100})
        obs = await fleet.converged(gen)
        pid = obs.slots["a"].pid
        assert pid is not None
        async with Load(fleet.port).running() as load:
            await wait_until(_const(load), lambda ld: ld.ok > 30, timeout=20, what="load")
            agent.signal(signal.SIGKILL)
            await agent.stop(timeout=0)
            served = load.ok
            await wait_until(
                _const(load),
                lambda ld: ld.ok > served + 50,
                timeout=20,
                what="traffic with the agent dead",
            )
            await agent.start()
            gen = await fleet.desire({"a": "1.0.0", "b": "2.0.0"}, {"a": 50, "b": 50})
            obs = await fleet.converged(gen)
        assert load.failed == 0, load.errors
        assert obs.slots["a"].pid == pid  # adopted, not restarted
        # Its port claimed again in the new agent's name (the old claim named a dead process).
        claim = claims_dir() / str(obs.slots["a"].port)
        assert str(claim.readlink()).split("-")[0] == str(agent.pid)
        hello_a = [
            p
            for p in _leftovers(fleet.base)
            if "app.py" in " ".join(p.cmdline()) and p.environ().get("FLEETWAVE_SLOT") == "a"
        ]
        assert [p.pid for p in hello_a] == [pid]


# The hello app run from its release dir, after a chdir to / (as a daemon does once started).
ROAMER = ("import os, runpy, sys; app = os.path.abspath('app.py'); os.chdir('/'); "
          "sys.argv = [app]; runpy.run_path(app, run_name='__main__')")


async def test_a_service_that_chdirs_away_is_adopted_after_kill_9(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    """A service that leaves its release dir once started (a daemon's chdir to /, gunicorn's
    --chdir) is adopted by the restarted agent, not started again beside the one still running
    (which nothing then watched or stopped, for good)."""
    src = _bundle(hello_bundle("1.0.0"), tmp_path / "roamer", fleet.port)
    m = src / "fleetwave.toml"
    command = f'command = ["python3", "-c", {json.dumps(ROAMER)}, "roamer"]'
    m.write_text(m.read_text().replace('version = "1.0.0"', 'version = "1.0.1"')
                 .replace('command = ["python3", "app.py"]', command))
    fleet.refs["1.0.1"] = (await push_release(fleet.bus, src)).info.ref
    agent = _agent(fleet, broker)
    async with reaping(agent):
        obs = await fleet.converged(await fleet.desire({"a": "1.0.1"}, {"a": 100}))
        pid = obs.slots["a"].pid
        assert pid is not None and psutil.Process(pid).cwd() == "/"
        agent.signal(signal.SIGKILL)
        await agent.stop(timeout=0)
        await agent.start()
        obs = await fleet.converged(await fleet.desire({"a": "1.0.1"}, {"a": 100}))
        assert obs.slots["a"].pid == pid and obs.slots["a"].status == "healthy"
        slot_a = [p.pid for p in psutil.process_iter()
                  if _environ(p).get("FLEETWAVE_SLOT") == "a"
                  and _environ(p).get("FLEETWAVE_NODE") == NODE
                  and str(fleet.base) in _environ(p).get("FLEETWAVE_RELEASE_DIR", "")]
        assert slot_a == [pid]


def _environ(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except psutil.Error:
        return {}


def _const(load: Load):  # type: ignore[no-untyped-def]
    async def probe() -> Load:
        return load

    return probe


WORKER = """\
import os, pathlib, signal, sys, time
flag = pathlib.Path(os.environ["FLEETWAVE_SLOT"] + ".alive")
signal.signal(signal.SIGTERM, lambda *_: (flag.unlink(missing_ok=True), sys.exit(0)))
flag.write_text(os.environ["FLEETWAVE_VERSION"])
while True:
    time.sleep(0.1)
"""


def _worker_bundle(dest: Path, version: str) -> Path:
    dest.mkdir(parents=True)
    (dest / "worker.py").write_text(WORKER)
    (dest / "check.py").write_text(
        "import os, pathlib, sys\n"
        "sys.exit(0 if pathlib.Path(os.environ['FLEETWAVE_SLOT'] + '.alive').exists() else 1)\n"
    )
    (dest / "fleetwave.toml").write_text(
        f'name = "hello"\nversion = "{version}"\ncommand = ["python3", "worker.py"]\n'
        '[health]\nexec = ["python3", "check.py"]\ninterval = "100ms"\nhealthy_threshold = 1\n'
        '[stop]\ndrain = "100ms"\ntimeout = "2s"\n'
    )
    return dest


async def test_worker_without_port_is_replaced_make_before_break(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    """A worker (no port, no router) gets its new slot healthy before the old one stops."""
    for v in ("w1", "w2"):
        bundle = _worker_bundle(tmp_path / "worker" / v, v)
        fleet.refs[v] = (await push_release(fleet.bus, bundle)).info.ref
    async with reaping(_agent(fleet, broker)):
        await fleet.converged(await fleet.desire({"a": "w1"}, {}))
        obs = await fleet.converged(await fleet.desire({"b": "w2"}, {}))
        assert obs.slots["b"].status == "healthy" and obs.slots["a"].status == "stopped"
        assert obs.router is None and obs.weights == {}
        events = await _events(fleet.bus, "slot.>")
        order = [(e.kind, e.data.get("slot")) for e in events]
        assert order.index(("slot.healthy", "b")) < order.index(("slot.stopped", "a"))


async def test_agent_started_before_the_fleet_exists_waits_for_it(
    broker: Broker, tmp_path: Path
) -> None:
    """An agent up before any coordinator created the buckets keeps waiting, then converges."""
    seed = generate_seed()
    agent = spawn_agent(
        broker.url, NODE, tmp_path / "agents", extra=["--trust-key", public_key(seed)]
    )
    async with reaping(agent):
        bus = await Bus.connect(broker.url, "default")
        try:
            await wait_until(
                lambda: _log_has(agent.log_path, "cannot watch desired states yet"),
                bool,
                timeout=20,
                what="the agent to notice the missing bucket",
            )
            await bus.ensure_fleet()
            port = free_port()
            path = _bundle(hello_bundle("1.0.0"), tmp_path / "b1", port)
            ref = (await push_release(bus, path)).info.ref
            f = Fleet(bus=bus, seed=seed, port=port, base=tmp_path / "agents", refs={"1.0.0": ref})
            obs = await f.converged(await f.desire({"a": "1.0.0"}, {"a": 100}))
            assert obs.slots["a"].status == "healthy" and agent.running
        finally:
            await bus.close()
            procs = _leftovers(tmp_path)
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(procs, timeout=5)
        _remove_socket_dir(tmp_path)


async def _log_has(path: Path, text: str) -> bool:
    return text in await asyncio.to_thread(
        lambda: path.read_text(errors="replace") if path.exists() else ""
    )


async def test_failed_generation_is_not_retried_after_an_agent_restart(
    fleet: Fleet, broker: Broker
) -> None:
    """A restarted agent remembers that a generation failed: it reports it and starts nothing."""
    agent = _agent(fleet, broker)
    async with reaping(agent):
        await fleet.converged(await fleet.desire({"a": "1.0.0"}, {"a": 100}))
        gen = await fleet.desire({"b": "2.1.0"}, {"b": 100})
        await wait_until(
            fleet.observed,
            lambda o: o is not None and o.phase == "failed",
            timeout=40,
            what="phase failed",
        )
        await agent.stop(timeout=0)  # SIGKILL
        restarted = time.time()
        await agent.start()
        obs = await wait_until(
            fleet.observed,
            lambda o: o is not None and o.time > restarted,
            timeout=20,
            what="an observed state from the restarted agent",
        )
        assert obs is not None and obs.phase == "failed" and obs.generation == gen
        assert obs.slots["b"].status == "failed" and obs.slots["a"].status == "healthy"
        started_b = [
            e for e in await _events(fleet.bus, "slot.started") if e.data.get("slot") == "b"
        ]
        assert len(started_b) == 1


async def test_router_flags_reach_the_router(fleet: Fleet, broker: Broker) -> None:
    """--router-trusted-proxy and --router-max-connections given to the agent are what its
    router does: a trusted peer's X-Forwarded-For is appended to, the cap answers 503."""
    agent = spawn_agent(broker.url, NODE, fleet.base, extra=[
        "--trust-key", public_key(fleet.seed), "--router-trusted-proxy", "127.0.0.0/8",
        "--router-max-connections", "2", "--router-body-timeout", "5s"])
    async with reaping(agent):
        obs = await fleet.converged(await fleet.desire({"a": "1.0.0"}, {"a": 100}))
        assert obs.phase == "converged"
        reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
            assert body["forwarded_for"] == "203.0.113.7, 127.0.0.1"
            # The second connection is the cap's last place; a third is turned away.
            second = await asyncio.open_connection("127.0.0.1", fleet.port)
            third = await asyncio.open_connection("127.0.0.1", fleet.port)
            status = await asyncio.wait_for(third[0].readline(), 5)
            assert status.startswith(b"HTTP/1.1 503"), status
            for _, w in (second, third):
                w.close()
        finally:
            writer.close()
