"""Shared machinery of the control-plane benchmarks (bench_control_plane, bench_fanout,
bench_rollback, bench_agent): a throwaway fleet on loopback, an event tap, process figures, the
bare-NATS "bus floor", and printing.

``SimFleet`` (an async context manager) starts a real nats-server
(``coordinator.dev.broker.Broker``, JetStream on disk in a temp dir, a free port) — or, with
``brokers=3``, a JetStream cluster of three (``coordinator.dev.cluster.BrokerCluster``; every
client gets all three URLs and the coordinator makes R3 streams) — the real
coordinator as a child process with its own signing key, and one ``fleetwave-agent --simulate N``
child hosting nodes ``sim-1..N``; it waits until the coordinator lists every node online. Leaving
stops the children (SIGTERM, then SIGKILL) and the broker, and reaps them, whatever happened.

``EventTap`` subscribes (core NATS) to every event of the fleet and keeps each with its receive
time, so a benchmark reads its figures from the coordinator's own audit trail: the ``time`` of an
event is the coordinator's clock at the decision, on the same machine as ours.

``run_main`` runs a benchmark's main coroutine so that SIGTERM (and SIGHUP) stop it as Ctrl-C
does: its context managers stop what it started. ``run_dir`` is a benchmark's temp dir, marked
with its pid: on the way out whatever still runs under it (detached routers, services) is
reaped, and a run killed with SIGKILL, which nothing can catch, is cleaned up by the next run.

``bus_floor`` is the yardstick for "within 3x of the bus": the same number of desired-state KV
writes and observed-state KV replies, in the same number of waves, done by a bare nats-py writer
and a bare nats-py responder process (one KV watch, one put per desired key it sees), on the same
broker, with payloads of the same size. It is what the protocol costs with no fleetwave logic.

Benchmarks run their children with bytecode written (``PYTHONDONTWRITEBYTECODE`` is dropped
from the environment they pass on): start-up figures are an installed package's.

This file is a benchmark helper, not part of the packages: it imports nats directly for the floor
(that is the point of a floor) and is run as ``python tests/perf/bench_*.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Every process a benchmark starts (coordinator, agents, the CLI) imports the packages as an
# installed fleetwave does: from bytecode compiled once. With PYTHONDONTWRITEBYTECODE set (some
# environments set it) a source changed since its .pyc was written is compiled again at every
# start (protocol/bus.py alone: ~20 ms), which no installed package pays (pip compiles a wheel's
# modules as it installs them). bench_vs_ansible's 20 hosts start that many agents and a CLI.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import psutil  # noqa: E402

from coordinator.auth.enroll import CA, AuthDir  # noqa: E402
from coordinator.dev.broker import Broker  # noqa: E402
from coordinator.dev.cluster import BrokerCluster  # noqa: E402
from coordinator.dev.devfleet import Child, python_module, reap_leftovers  # noqa: E402
from coordinator.dev.examples import assembled  # noqa: E402
from coordinator.releases import push_release  # noqa: E402
from coordinator.runtime.keyfile import coordinator_seed  # noqa: E402
from protocol import creds as creds_file  # noqa: E402
from protocol import subjects  # noqa: E402
from protocol.bus import Bus  # noqa: E402
from protocol.codec import decode, encode  # noqa: E402
from protocol.events import received_all  # noqa: E402
from protocol.messages import (  # noqa: E402
    TERMINAL_STATES,
    ApiReply,
    DeployRequest,
    Event,
    NodesRequest,
    RolloutRequest,
    RolloutSpec,
)
from protocol.signing import public_key  # noqa: E402

FLEET = "perf"
SUBNET = os.environ.get("FLEETWAVE_PERF_SUBNET", "127.0.15")  # own loopback subnet: never collides
API_TIMEOUT = 60.0


T = TypeVar("T")
RUN_MARKER = "bench-run.pid"  # in a run_dir: "<pid> <create time>" of the benchmark that owns it


# -- processes -------------------------------------------------------------------------------------


def run_main(main: Coroutine[Any, Any, T],
             run: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run) -> T:
    """``asyncio.run(main)``, with SIGTERM and SIGHUP cancelling it as Ctrl-C does, so that its
    ``finally`` blocks and context managers stop the broker, coordinator, agents and routers it
    started (the default action would end this process alone and leave them all running);
    exits 128 + the signal's number then, as a shell reports a process a signal ended."""
    got: list[int] = []

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda sig=sig: (got.append(sig), task.cancel()))
        return await main

    try:
        return run(guarded())
    except asyncio.CancelledError:
        if not got:
            raise
        print(f"stopped by {signal.Signals(got[0]).name}; everything it started is stopped",
              file=sys.stderr)
        sys.exit(128 + got[0])


@contextlib.contextmanager
def run_dir(prefix: str) -> Iterator[Path]:
    """A temp dir for one run (named ``prefix...``), after reaping the leftovers of killed runs
    of the same prefix; on the way out, whatever still runs under it is stopped and it is
    removed. With ``FLEETWAVE_PERF_KEEP=DIR``, a run that fails leaves its logs and state
    files (not its stores, releases or slots) in ``DIR/<its name>`` first, and says where."""
    reap_killed_runs(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    me = psutil.Process()
    (path / RUN_MARKER).write_text(f"{me.pid} {me.create_time()}")
    try:
        yield path
    except BaseException:
        keep = os.environ.get("FLEETWAVE_PERF_KEEP")
        if keep:
            kept = Path(keep) / path.name
            shutil.copytree(path, kept, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("jetstream", "releases", "slots",
                                                          "*.sock"))
            print(f"the failed run's logs are kept in {kept}", file=sys.stderr)
        raise
    finally:
        reap_leftovers(path, exclude=set())
        shutil.rmtree(path, ignore_errors=True)


def reap_killed_runs(prefix: str) -> int:
    """Stop what runs under the temp dirs of dead runs of ``prefix`` (their marker names a
    process that is gone) and remove the dirs; how many runs. A dir without a marker may be a
    live run of an older script: left alone."""
    reaped = 0
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            pid, created = (path / RUN_MARKER).read_text().split()
        except (OSError, ValueError):
            continue
        try:
            if psutil.Process(int(pid)).create_time() == float(created):
                continue  # that run is alive
        except psutil.NoSuchProcess:
            pass
        count = reap_leftovers(path, exclude=set())
        shutil.rmtree(path, ignore_errors=True)
        print(f"reaped {count} leftover processes of a killed run in {path}", file=sys.stderr)
        reaped += 1
    return reaped


async def await_exit(pid: int, timeout: float = 10.0) -> None:
    """Wait for a process that is not our child (a detached router told to shut down) to exit;
    SIGKILL it after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def servers_cpu_seconds(fleet: SimFleet) -> float:
    """User + system CPU seconds so far of every nats-server of ``fleet``."""
    return sum(cpu_seconds(b.pid) for b in fleet.brokers if b.pid is not None)


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def peak_rss_mb(pid: int) -> float:
    """The process's lifetime peak resident set (VmHWM, Linux), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss_mb(pid)


async def poll(probe: Callable[[], Any], ok: Callable[[Any], bool], *, timeout: float,
               what: str, interval: float = 0.05) -> Any:
    """Await ``probe()`` until ``ok(result)``; RuntimeError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if ok(last):
            return last
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}; last: "
                               f"{str(last)[:300]}")
        await asyncio.sleep(interval)


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM ``proc`` if it still runs, SIGKILL it after ``grace`` seconds; reap it."""
    if proc.returncode is None:
        proc.terminate()
    try:
        async with asyncio.timeout(grace):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def py_spy() -> str | None:
    """The py-spy executable (on PATH or beside this Python), or None when it is not installed."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else None


def need_py_spy(profile: Path | None, script: str) -> None:
    """Exit 2 with one line before anything runs when ``--profile`` is asked for and py-spy is
    not installed (it is not a dependency of the project)."""
    if profile is not None and py_spy() is None:
        print(f"{script}: --profile needs py-spy, which is not installed; run "
              "'.venv/bin/pip install py-spy' (or drop --profile)", file=sys.stderr)
        raise SystemExit(2)


class Profile:
    """``py-spy record`` of one process while the ``async with`` block runs (raw collapsed stacks
    in ``out``, summarised by ``top``); does nothing when ``out`` is None. py-spy samples from
    outside (no instrumentation in the measured process); it needs ptrace rights (root, or
    kernel.yama.ptrace_scope 0)."""

    def __init__(self, pid: int, out: Path | None, rate: int = 200) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Profile:
        if self.out is None:
            return self
        spy = py_spy()
        if spy is None:
            raise RuntimeError("py-spy is not installed (need_py_spy checks it first)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._proc = await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(self.pid), "--format", "raw", "--rate", str(self.rate),
            "--output", str(self.out), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.sleep(1.0)  # py-spy attaches before the measured work starts
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


def top(raw: Path, n: int = 25) -> list[tuple[str, float, float]]:
    """(function, self %, total %) of the ``n`` costliest functions in a py-spy raw profile."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        samples += k
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")")
                  for f in stack.split(";")]
        for f in set(frames):
            total[f] = total.get(f, 0) + k
        own[frames[-1]] = own.get(frames[-1], 0) + k
    if not samples:
        return []
    ranked = sorted(own, key=lambda f: -own[f])[:n]
    return [(f, 100 * own[f] / samples, 100 * total[f] / samples) for f in ranked]


def print_top(raw: Path, n: int = 25) -> None:
    print(f"\n  profile {raw} (self %, total %):")
    for f, mine, incl in top(raw, n):
        print(f"  {mine:6.1f} {incl:6.1f}  {f}")


# -- the event tap ---------------------------------------------------------------------------------


@dataclass
class Seen:
    event: Event
    received: float  # time.time() when it reached us


@dataclass
class EventTap:
    events: list[Seen] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, bus: Bus) -> None:
        async def on_event(subject: str, data: bytes) -> None:
            now = time.time()
            self.events += [Seen(e, now) for e in received_all(bus.fleet, subject, data)]
            self.changed.set()

        await bus.subscribe(subjects.events(bus.fleet), on_event)

    def of(self, rollout: str, *kinds: str) -> list[Event]:
        return [s.event for s in self.events
                if s.event.rollout == rollout and (not kinds or s.event.kind in kinds)]

    async def wait_for(self, rollout: str, kinds: tuple[str, ...], timeout: float) -> Seen:
        """The first event of ``rollout`` of one of ``kinds`` (waiting up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            for s in self.events:
                if s.event.rollout == rollout and s.event.kind in kinds:
                    return s
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [s.event.kind for s in self.events if s.event.rollout == rollout][-5:]
                raise RuntimeError(f"rollout {rollout}: no {'/'.join(kinds)} event within "
                                   f"{timeout:g}s (last events: {seen})")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self.changed.wait()


# -- the fleet -------------------------------------------------------------------------------------


class SimFleet:
    """Broker + coordinator + one ``--simulate N`` agent in a temp dir; an async context manager."""

    def __init__(self, nodes: int, *, fleet: str = FLEET, sim_env: dict[str, str] | None = None,
                 heartbeat: float = 2.0, keep: bool = False, brokers: int = 1,
                 secure: bool = False, max_payload: str = "8MB",
                 lease_ttl: float | None = None) -> None:
        self.n = nodes
        self.fleet = fleet
        self.heartbeat = heartbeat
        self.sim_env = sim_env or {}
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="fw-perf-"))
        # secure: TLS and nkey users (fleetwave auth) for every client; the simulated agent,
        # standing for every node on one connection, runs as the coordinator's identity.
        self.auth = self.dir / "auth" if secure else None
        self.cluster: BrokerCluster | None = None
        if brokers == 1:
            self.broker = Broker(store_dir=self.dir / "js", auth=self.auth,
                                 max_payload=max_payload)
            self.brokers = [self.broker]
        else:
            self.cluster = BrokerCluster(self.dir, brokers, auth=self.auth,
                                         max_payload=max_payload)
            self.brokers = self.cluster.brokers
            self.broker = self.brokers[0]
        self.url = ",".join(b.url for b in self.brokers)  # every client gets every broker
        self.key_file = self.dir / "coordinator.seed"
        self.coordinator = Child(
            "coordinator",
            python_module("coordinator.daemon", "--nats", self.url, "--fleet", fleet,
                          "coordinator", "--key-file", str(self.key_file),
                          *(["--lease-ttl", f"{lease_ttl:g}"] if lease_ttl else []),
                          *self.secure_args()),
            self.dir / "logs" / "coordinator.log")
        self.agent: Child | None = None
        self.bus: Bus | None = None
        self.tap = EventTap()

    async def __aenter__(self) -> SimFleet:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def secure_args(self) -> list[str]:
        """``--creds`` and ``--tls-ca`` of the coordinator's identity (none if not secure)."""
        if self.auth is None:
            return []
        return ["--creds", str(AuthDir(self.auth).creds_path("coordinator", "coordinator")),
                "--tls-ca", str(self.auth / CA)]

    def access(self) -> dict[str, Any]:
        """``Bus.connect``'s credentials and TLS arguments (the coordinator's identity)."""
        if self.auth is None:
            return {}
        return {"creds": creds_file.load(AuthDir(self.auth).creds_path("coordinator",
                                                                        "coordinator")),
                "tls_ca": str(self.auth / CA)}

    async def start(self) -> None:
        key = public_key(await asyncio.to_thread(coordinator_seed, self.key_file))
        if self.auth is not None:
            await asyncio.to_thread(AuthDir(self.auth).init, self.fleet, (), "admin")
        if self.cluster is not None:
            await self.cluster.start()
        else:
            await self.broker.start()
        await self.coordinator.start()
        self.bus = await Bus.connect(self.url, self.fleet, name="fleetwave-perf",
                                     **self.access())
        await poll(self._nodes_or_none, lambda rows: rows is not None, timeout=30,
                   what="the coordinator's API")
        await self.tap.start(self.bus)
        if self.n:
            self.agent = Child("sim", python_module(
                "agent.main", "--node-id", "sim", "--simulate", str(self.n), "--trust-key", key,
                "--nats", self.url, "--fleet", self.fleet, "--data-dir",
                str(self.dir / "sim"), "--bind-host", f"{SUBNET}.1",
                "--heartbeat-interval", str(self.heartbeat), *self.secure_args()),
                self.dir / "logs" / "sim.log")
            old = {k: os.environ.get(k) for k in self.sim_env}
            os.environ.update(self.sim_env)  # Child passes os.environ on to the agent
            try:
                await self.agent.start()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            await self.wait_online(self.n, timeout=60 + self.n / 50)
        for v in ("1.0.0", "2.0.0"):
            await push_release(self.bus, assembled(v))

    async def stop(self) -> None:
        try:
            if self.bus is not None:
                await self.bus.close()
                self.bus = None
            children = [c for c in (self.agent, self.coordinator) if c is not None]
            await asyncio.gather(*(c.stop(timeout=10) for c in children), return_exceptions=True)
        finally:
            await asyncio.gather(*(b.stop() for b in self.brokers), return_exceptions=True)
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    async def _nodes_or_none(self) -> list[dict[str, Any]] | None:
        try:
            return await self.api("nodes", NodesRequest(), timeout=30)  # type: ignore[no-any-return]
        except RuntimeError:
            return None

    async def wait_online(self, count: int, *, timeout: float) -> None:
        """Until ``count`` nodes registered (their keys in the nodes bucket), then until the
        coordinator's node table says so (the ``nodes`` API: past ``max_payload``, in parts)."""
        assert self.bus is not None
        bus = self.bus

        async def registered() -> int:
            return len(await bus.kv_entries(subjects.nodes_bucket(self.fleet)))

        await poll(registered, lambda n: n >= count, timeout=timeout,
                   what=f"{count} nodes registered", interval=0.5)
        await poll(self._nodes_or_none,
                   lambda rows: rows is not None and sum(r["online"] for r in rows) >= count,
                   timeout=timeout, what=f"{count} nodes online", interval=0.5)

    async def api(self, verb: str, request: Any, *, timeout: float = API_TIMEOUT) -> Any:
        assert self.bus is not None
        try:
            raw = await self.bus.request(subjects.api(self.fleet, "perf", verb), encode(request),
                                         timeout=timeout)
        except Exception as exc:  # NotReachable, BusError: say which verb
            raise RuntimeError(f"api {verb}: {exc}") from None
        reply = decode(ApiReply, raw)
        if reply.code == "accepted":  # recorded, its start failed: the next leader starts it
            print(f"api {verb}: {reply.error}", file=sys.stderr)
            return reply.data
        if not reply.ok:
            raise RuntimeError(f"api {verb} refused: {reply.error}")
        return reply.data

    async def deploy(self, spec: RolloutSpec, *,
                     timeout: float = API_TIMEOUT) -> tuple[str, float]:
        """Start a rollout; return its id and the time.time() the request was sent."""
        sent = time.time()
        data = await self.api("deploy", DeployRequest(spec=spec), timeout=timeout)
        return str(data["id"]), sent

    async def finish(self, rollout: str, timeout: float) -> tuple[Event, float]:
        """Wait for the rollout's terminal event; return it and when we received it."""
        kinds = (*tuple(f"rollout.{s}" for s in TERMINAL_STATES), "rollout.paused")
        seen = await self.tap.wait_for(rollout, kinds, timeout)
        return seen.event, seen.received

    async def status(self, rollout: str) -> dict[str, Any]:
        return await self.api("status", RolloutRequest(id=rollout))  # type: ignore[no-any-return]


def rolling(version: str, *, batch: str = "10%") -> RolloutSpec:
    """A rolling rollout in waves of ``batch`` with bake 0 and max-unavailable = the batch."""
    return RolloutSpec(service="hello", version=version, batch=batch, max_unavailable=batch,
                       bake=0.0, progress_deadline=120.0)


# -- the bus floor ---------------------------------------------------------------------------------

FLOOR_DESIRED = "floor-desired"
FLOOR_OBSERVED = "floor-observed"
FLOOR_FLEET = "floor"


async def floor_responder(url: str, key: str = "") -> None:
    """The bare responder, as fast as nats-py goes: an ordered push consumer on the desired
    bucket's subjects, and for each entry one observed put, published at once with its ack
    coming to one shared inbox (pipelined; nothing awaited per put); with ``key``, each entry's
    signature is checked first, as an agent checks its own."""
    import nats

    from protocol.codec import decode
    from protocol.messages import SignedEnvelope
    from protocol.signing import verify

    nc = await nats.connect(url)
    js = nc.jetstream()
    desired, observed = f"$KV.{FLOOR_DESIRED}.", f"$KV.{FLOOR_OBSERVED}."
    acks = nc.new_inbox()
    failed = 0

    async def on_ack(msg: Any) -> None:
        nonlocal failed
        if b'"error"' in msg.data:
            failed += 1
            if failed == 1 or failed % 1000 == 0:
                print(f"floor responder: {failed} observed puts failed ({msg.data!r})",
                      file=sys.stderr, flush=True)

    async def on_desired(msg: Any) -> None:
        k = msg.subject[len(desired):]
        if key:
            node, _, service = k.partition(".")
            verify(decode(SignedEnvelope, msg.data), (key,), fleet=FLOOR_FLEET, node=node,
                   service=service, min_generation=0)
        await nc.publish(observed + k, msg.data, reply=acks)

    await nc.subscribe(acks, cb=on_ack)
    await js.subscribe(f"{desired}>", cb=on_desired, ordered_consumer=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


ATOMIC_MAX = 1000  # messages the server takes in one atomic batch (nats-server >= 2.12)


async def atomic_put(nc: Any, prefix: str, items: list[tuple[str, bytes]],
                     timeout: float = 30.0) -> None:
    """Put every (key, value) under the KV subject ``prefix`` as one atomic batch: all
    published with ``Nats-Batch-Id``/``Nats-Batch-Sequence``, the last with
    ``Nats-Batch-Commit`` as a request, answered once the whole batch is stored (one write to the
    stream's log, one fsync under ``sync_interval: always``)."""
    batch = uuid.uuid4().hex
    for i, (key, value) in enumerate(items[:-1]):
        await nc.publish(f"{prefix}{key}", value, headers={
            "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i + 1)})
    key, value = items[-1]
    msg = await nc.request(f"{prefix}{key}", value, timeout=timeout, headers={
        "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(len(items)),
        "Nats-Batch-Commit": "1"})
    ack = json.loads(msg.data)
    if ack.get("error"):
        raise RuntimeError(f"atomic batch refused: {ack['error']}")


async def bus_floor(url: str, nodes: int, waves: int, payload: int, *,
                    concurrency: int = 256, signed: bool = False) -> float:
    """Seconds for ``nodes`` desired puts and as many observed replies, in ``waves`` waves: what
    a hand-written nats-py program takes at best. The desired puts of a wave go out as atomic
    batches of up to ``ATOMIC_MAX`` (as the coordinator writes, with one fsync each rather than
    one a message), concurrently; the responder, standing for the nodes' agents, puts one
    observed state per desired state it sees, as each agent does, to a bucket kept in memory as
    fleetwave's is. ``signed``: the desired states are real ones (two slots, as a blue-green
    node's), signed as each batch goes out, one signature a batch with a Merkle proof a state
    (``protocol.signing.sign_batch``, as the coordinator signs for agents that take it), and
    verified by the responder before it answers (each state's leaf and proof; the batch's
    signature once, ``verify`` remembering a root it checked, as one host checks its own): the
    work no coordinator and no agent may skip."""
    import nats
    from nats.js import api as js_api

    from protocol.codec import encode
    from protocol.messages import DesiredState, ReleaseRef
    from protocol.signing import generate_seed, public_key, sign_batch

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        # The storage fleetwave keeps each in (``protocol.bus._storage``): the observed bucket
        # in memory, the desired one on disk.
        for b, hist, storage in ((FLOOR_DESIRED, 5, js_api.StorageType.FILE),
                                 (FLOOR_OBSERVED, 1, js_api.StorageType.MEMORY)):
            with contextlib.suppress(Exception):
                await js.delete_key_value(b)
            await js.create_key_value(bucket=b, history=hist, storage=storage)
        config = (await js.stream_info(f"KV_{FLOOR_DESIRED}")).config
        config.allow_atomic = True
        await js.update_stream(config)
        desired = await js.key_value(FLOOR_DESIRED)
        observed = await js.key_value(FLOOR_OBSERVED)
        seed = generate_seed()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "floor-responder", url,
            *([public_key(seed)] if signed else []), stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                await proc.stdout.readline()
            seen: set[str] = set()
            done = asyncio.Event()
            want: set[str] = set()
            w = await observed.watch(">")

            async def collect() -> None:
                while True:
                    e = await w.updates(timeout=None)
                    if e is None:
                        continue
                    seen.add(e.key)
                    if want <= seen:
                        done.set()

            collector = asyncio.create_task(collect())
            value = b"x" * payload
            keys = [f"node-{i}.hello" for i in range(1, nodes + 1)]
            size = -(-nodes // waves)
            sem = asyncio.Semaphore(concurrency)

            ref = ReleaseRef(service="hello", version="1.0.0", digest="sha256:" + "d" * 64)

            def signed_values(ks: list[str]) -> list[bytes]:
                return [encode(env) for env in sign_batch(seed, [DesiredState(
                    fleet=FLOOR_FLEET, node=k.partition(".")[0], service="hello", generation=5,
                    slots={"a": ref, "b": ref}, weights={"a": 100, "b": 0}) for k in ks],
                    term=3)]

            async def put(ks: list[str]) -> None:
                async with sem:
                    # Signed in worker threads (libsodium runs outside the GIL), as the
                    # coordinator signs, while other batches are written.
                    values = (await asyncio.to_thread(signed_values, ks)
                              if signed else [value] * len(ks))
                    await atomic_put(nc, desired._pre, list(zip(ks, values, strict=True)))

            started = time.perf_counter()
            for i in range(0, nodes, size):
                wave = keys[i:i + size]
                want.update(wave)
                done.clear()
                if not want <= seen:
                    await asyncio.gather(*(put(wave[j:j + ATOMIC_MAX])
                                           for j in range(0, len(wave), ATOMIC_MAX)))
                    async with asyncio.timeout(120):
                        await done.wait()
            elapsed = time.perf_counter() - started
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            return elapsed
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    finally:
        await nc.close()


# -- printing --------------------------------------------------------------------------------------


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def add_secure_flags(ap: Any, secure: str, compare: str) -> None:
    """``--secure`` (TLS and authentication) and ``--compare`` (plain and secure in one run),
    one or the other, on a benchmark's argparse parser; the helps say what each runs."""
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--secure", action="store_true", help=secure)
    how.add_argument("--compare", action="store_true", help=compare)


def ratio_rows(plain: dict[str, Any], secure: dict[str, Any],
               fields: list[tuple[str, str, str]],
               names: tuple[str, str] = ("plain", "TLS+auth")) -> list[tuple[str, str]]:
    """Rows ``label: plain X, TLS+auth Y (Z x)`` for each (label, key, unit) in ``fields``:
    the cost of TLS and authentication (or of what ``names`` says) measured in one run."""
    out = []
    for label, key, unit in fields:
        a, b = plain.get(key), secure.get(key)
        if a is None or b is None:
            continue
        ratio = f"{b / a:.2f}x" if a else "n/a"
        out.append((label, f"{names[0]} {a:g}{unit}, {names[1]} {b:g}{unit} ({ratio})"))
    return out


def emit(as_json: bool, title: str, figures: dict[str, Any],
         rows: list[tuple[str, str]]) -> None:
    if as_json:
        print(json.dumps(figures, indent=2, sort_keys=True))
    else:
        print_table(title, rows)


if __name__ == "__main__" and sys.argv[1:2] == ["floor-responder"]:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(floor_responder(sys.argv[2], *sys.argv[3:4]))
