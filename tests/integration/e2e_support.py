"""Helpers shared by the end-to-end tests (a DevFleet, the real CLI, real traffic).

- ``push(url, *versions)``: ``fleetwave release push`` of example hello bundles.
- ``status(url, rid)``: ``fleetwave status RID -o json`` as a dict ("" for the latest).
- ``serving(fleet)``: what each node's router answers now, by node id.
- ``service_pids(fleet)``: the service processes the fleet's agents run now, found with psutil
  (not from what the agents say), as {pid: (node, slot, version)}.
- ``loaded(fleet)``: steady checked traffic (``coordinator.dev.traffic.Traffic``) through every
  node's router while the block runs.
- ``settle(traffic, version)``: waits until that load has had a few more answers from
  ``version``.
- ``install(fleet, version)``: every node on ``version`` at once, checked through the routers.
- ``watched(look)``: samples ``look()`` (what every node answers) every ~50 ms while the block
  runs: the most nodes ever seen without a version at once, and every version seen.
- ``audit(events)``: checks a rollout's event log has every event once (no id twice, no wave
  started or judged twice, no node moved twice per direction, one start and one end).
- ``deploy_detached(url, version, *flags)``: ``fleetwave deploy hello VERSION --detach``; the id.
- ``record_of(bus, rid)``: the rollout record as stored (cheaper than ``status`` in a tight poll).
- ``desired_log(url)``: every desired state still kept in the desired bucket's history (the KV
  stream), oldest first, as signed envelopes.
- ``leader_of(bus)``: what the coordinators' ``leader`` verb says of the lease.
- ``Receiver(host)``: a real webhook receiver (``--notify``) that keeps what it accepted, can
  answer errors first or slowly; ``receivers(*rs)`` stops them at the end of the block.
- ``kv_log(bus, bucket)``: every message a KV bucket's stream still holds (``kv_logs``: of the
  rollouts and desired buckets); ``kv_landed(bus)``:
  every write that lands in the fenced buckets while the block runs (kept even if the bucket's
  history drops it later); ``assert_fenced_off(logs, term)``: nothing of a term below ``term``
  landed in the rollouts or desired bucket after the fence of ``term``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil

from coordinator.dev.devfleet import DevFleet
from coordinator.dev.traffic import Traffic, probe_version
from coordinator.runtime.store import RolloutStore
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.errors import BusError
from protocol.history import unpack_page
from protocol.messages import ApiReply, FenceMarker, RolloutRecord, SignedEnvelope
from tests.integration.procs import fleetwave, hello_bundle, wait_until

PORT = 8080
DEPLOY_TIMEOUT = 100.0


async def push(url: str, *versions: str) -> None:
    """Push the example hello bundles ``versions`` to the fleet's release store."""
    for v in versions:
        code, _, err = await fleetwave("release", "push", str(hello_bundle(v)), nats_url=url)
        assert code == 0, f"release push {v} failed ({code}): {err}"


async def status(url: str, rid: str = "") -> dict[str, Any]:
    """``fleetwave status [RID] -o json``; fails the test on a CLI error."""
    code, out, err = await fleetwave("status", *([rid] if rid else []), "-o", "json",
                                     nats_url=url)
    assert code == 0, f"fleetwave status failed ({code}): {err}"
    doc: dict[str, Any] = json.loads(out)
    return doc


async def events_of(url: str, rid: str) -> list[dict[str, Any]]:
    """The events of one rollout ("": the whole fleet's), oldest first."""
    code, out, err = await fleetwave("events", *(["--rollout", rid] if rid else []), "-o",
                                     "json", nats_url=url)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def serving(fleet: DevFleet) -> dict[str, str]:
    """What each node's router answers now: a version, or ``<why not>``."""
    answers = await asyncio.gather(
        *(probe_version(fleet.host(i), PORT) for i in range(1, len(fleet.agents) + 1))
    )
    return {f"node-{i}": v for i, v in enumerate(answers, start=1)}


def _service_pids(root: str) -> dict[int, tuple[str, str, str]]:
    found: dict[int, tuple[str, str, str]] = {}
    for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
        cwd = proc.info.get("cwd") or ""
        argv = proc.info.get("cmdline") or []
        if not cwd.startswith(root) or "app.py" not in argv or "--smoke" in argv:
            continue
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[proc.pid] = (env.get("FLEETWAVE_NODE", "?"), env.get("FLEETWAVE_SLOT", "?"),
                               env.get("FLEETWAVE_VERSION", "?"))
    return found


async def service_pids(fleet: DevFleet) -> dict[int, tuple[str, str, str]]:
    """The live service processes under the fleet's directory: {pid: (node, slot, version)}."""
    return await asyncio.to_thread(_service_pids, str(fleet.dir))


@contextlib.asynccontextmanager
async def loaded(fleet: DevFleet, *, rate: float = 20.0) -> AsyncIterator[Traffic]:
    """Steady GET traffic to every node's router (2 workers each) while the block runs."""
    traffic = Traffic([(fleet.host(i), PORT) for i in range(1, len(fleet.agents) + 1)],
                      workers_per_target=2, rate=rate)
    traffic.start()
    try:
        yield traffic
    finally:
        await traffic.stop()


async def settle(traffic: Traffic, version: str, more: int = 30) -> None:
    """Wait until the load has seen ``more`` further answers from ``version``."""
    seen = traffic.report.versions[version]

    async def count() -> int:
        return traffic.report.versions[version]

    await wait_until(count, lambda n: n >= seen + more, timeout=30,
                     what=f"{more} more answers from {version}")


async def desired_log(url: str, fleet: str = "default") -> list[SignedEnvelope]:
    """Every desired-state write the bucket's history still holds, oldest first.

    The bucket keeps the last few revisions per key, so a caller that wants the whole story checks
    that each key's oldest kept generation is its first one.
    """
    bucket = subjects.desired_bucket(fleet)
    bus = await Bus.connect(url, fleet, name="fleetwave-test")
    try:
        return [decode(SignedEnvelope, raw)
                async for raw in bus.stream_messages(f"KV_{bucket}", f"$KV.{bucket}.*.*")
                if raw]  # node.service keys: not the fence marker
    finally:
        await bus.close()


async def install(
    fleet: Any, version: str, look: Callable[[], Awaitable[dict[str, str]]] | None = None
) -> None:
    """Every node on ``version`` in one wave (nothing serves yet), checked through the routers
    (``look``: what every node answers; ``serving(fleet)`` of a DevFleet by default)."""
    code, out, err = await fleetwave("deploy", "hello", version, "--batch", "100%",
                                     "--max-unavailable", "100%", nats_url=fleet.nats_url,
                                     timeout=DEPLOY_TIMEOUT)
    assert code == 0, f"installing {version} failed ({code}): {out}{err}"
    await wait_until(look or (lambda: serving(fleet)), lambda v: set(v.values()) == {version},
                     timeout=30, what=f"every node serving {version}")


SAMPLE_PERIOD = 0.05


@dataclass
class Availability:
    """What a ``watched`` sampler saw: per sample, the nodes that did not answer with a version."""

    samples: int = 0
    worst: int = 0
    worst_at: dict[str, str] = field(default_factory=dict)
    versions: Counter[str] = field(default_factory=Counter)
    per_node: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, answers: dict[str, str]) -> None:
        self.samples += 1
        down = {n: v for n, v in answers.items() if v.startswith("<")}
        self.versions.update(v for v in answers.values() if not v.startswith("<"))
        for n, v in answers.items():
            self.per_node.setdefault(n, Counter())[v] += 1
        if len(down) > self.worst:
            self.worst, self.worst_at = len(down), down


@contextlib.asynccontextmanager
async def watched(
    look: Callable[[], Awaitable[dict[str, str]]], period: float = SAMPLE_PERIOD
) -> AsyncIterator[Availability]:
    """Sample ``look()`` (each node's answer: a version or ``<why not>``) about every
    ``period`` while the block runs."""
    seen, stop = Availability(), asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            started = time.monotonic()
            seen.add(await look())
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    task = asyncio.create_task(sample())
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


TERMINAL_EVENTS = {"rollout.succeeded", "rollout.rolled_back", "rollout.failed",
                   "rollout.aborted"}


def audit(events: list[dict[str, Any]]) -> Counter[str]:
    """Check one rollout's event log (``events_of``) has every event exactly once; the kinds.

    No event id twice (a republished event keeps its id: seen twice, it was stored twice); one
    ``rollout.started`` first and one terminal event last; waves started in order 0, 1, 2...
    each once; each wave's gates judged at most once; per node at most one ``node.updating``
    and ``node.done`` going forward (a rollback's own moves are counted apart).
    """
    ids = Counter(e["id"] for e in events)
    twice = [i for i, n in ids.items() if n > 1]
    assert not twice, f"events stored twice: {twice}"
    kinds = [e["kind"] for e in events]
    assert kinds and kinds[0] == "rollout.started", f"first event is not rollout.started: {kinds}"
    ends = [k for k in kinds if k in TERMINAL_EVENTS]
    assert len(ends) == 1 and kinds[-1] == ends[0], f"not one terminal event, last: {kinds}"
    waves = [e["data"].get("wave") for e in events if e["kind"] == "wave.started"]
    assert waves == list(range(len(waves))), f"waves started out of order or twice: {waves}"
    judged = [e["data"].get("wave") for e in events if e["kind"] in ("gate.passed",
                                                                      "gate.failed")]
    assert len(judged) == len(set(judged)), f"a wave's gates judged twice: {judged}"
    back = kinds.index("rollout.rolling_back") if "rollout.rolling_back" in kinds else len(kinds)
    for part in (events[:back], events[back:]):
        for kind in ("node.updating", "node.done"):
            moved = Counter(e["node"] for e in part if e["kind"] == kind)
            assert all(n == 1 for n in moved.values()), f"{kind} twice: {moved}"
    return Counter(kinds)


async def deploy_detached(url: str, version: str, *flags: str) -> str:
    """``fleetwave deploy hello VERSION FLAGS --detach``; the rollout id."""
    code, out, err = await fleetwave("deploy", "hello", version, *flags, "--detach", nats_url=url)
    assert code == 0, f"deploy {version} refused ({code}): {out}{err}"
    return out.strip()


async def record_of(bus: Bus, rid: str) -> RolloutRecord:
    """The rollout record as the coordinator persisted it (AssertionError, which ``wait_until``
    retries, while the broker cannot be read)."""
    try:  # the store reads a split record's head and its pages (coordinator.core.pages)
        found = await RolloutStore(bus).find(rid)
    except BusError as exc:
        raise AssertionError(f"cannot read rollout {rid}: {exc}") from None
    assert found is not None, f"no rollout {rid} in the rollouts bucket"
    assert isinstance(found[0], RolloutRecord), f"rollout {rid} was reduced to its summary"
    return found[0]


def desired_history(log: list[SignedEnvelope]) -> dict[str, list[int]]:
    """Check a ``desired_log``: per (node, service) key the generations it was written with,
    in write order; fails the test if one generation came with two different contents or if the
    history was cut (a key's oldest kept write is not generation 1)."""
    seen: dict[tuple[str, str, int], bytes] = {}
    out: dict[str, list[int]] = {}
    for env in log:
        key = subjects.node_service_key(env.node, env.service)
        first = seen.setdefault((env.node, env.service, env.generation), env.payload)
        assert first == env.payload, (
            f"{key} got generation {env.generation} twice with different contents")
        out.setdefault(key, []).append(env.generation)
    for key, gens in out.items():
        assert gens[0] == 1, f"{key}: history starts at generation {gens[0]}, not 1 (cut)"
    return out


async def assert_told_once(url: str, rid: str, nodes: list[str],
                           waves: int) -> list[dict[str, Any]]:
    """The audit log of a rolling rollout of one node a wave that succeeded: every node updated
    and done once, every wave started and its gates passed once, in order, one success, no
    rollback. Returns the events."""
    events = await told(url, rid, "rollout.succeeded")
    kinds = [e["kind"] for e in events]
    assert sorted(e["node"] for e in events if e["kind"] == "node.updating") == nodes, kinds
    assert sorted(e["node"] for e in events if e["kind"] == "node.done") == nodes, kinds
    started = [e["data"].get("wave") for e in events if e["kind"] == "wave.started"]
    assert started == list(range(waves)), f"waves started out of order, twice or skipped: {started}"
    passed = sorted(e["data"].get("wave") for e in events if e["kind"] == "gate.passed")
    assert passed == list(range(waves)), f"every wave's gates judged once: {passed}"
    assert kinds.count("rollout.succeeded") == 1 and "rollout.rolling_back" not in kinds, kinds
    assert len({e["id"] for e in events}) == len(events), "an event was recorded twice"
    return events


async def leader_of(bus: Bus) -> dict[str, Any]:
    """What the coordinators' API says of the lease (``leader`` verb): holder, term, ..."""
    raw = await bus.request(subjects.api(bus.fleet, "tests", "leader"), b"{}", timeout=5.0)
    reply = decode(ApiReply, raw)
    assert reply.ok, reply.error
    assert isinstance(reply.data, dict)
    return reply.data


async def told(url: str, rid: str, kind: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The rollout's events once ``kind`` is among them. A record reads "succeeded" as soon as
    it is persisted, before the last writes it decided (the old slots retired); its terminal
    event is published after them: wait for it before reading what was written."""
    return await wait_until(lambda: events_of(url, rid),
                            lambda evs: any(e["kind"] == kind for e in evs),
                            timeout=timeout, what=f"the {kind} event of {rid}")


KvMessage = tuple[int, str, bytes]  # (stream sequence, subject, data)


async def kv_log(bus: Bus, bucket: str) -> list[KvMessage]:
    """Every message the stream of KV ``bucket`` still holds, oldest first."""
    name = f"KV_{bucket}"
    info = await bus.js.stream_info(name)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(name, seq)
        except Exception:  # deleted or purged by the bucket's history: not there to check
            continue
        out.append((seq, msg.subject or "", msg.data or b""))
    return out


def fenced_logs_of(fleet: str) -> tuple[str, str]:
    """The buckets whose logs ``assert_fenced_off`` checks: rollouts and desired."""
    return subjects.rollouts_bucket(fleet), subjects.desired_bucket(fleet)


async def kv_logs(bus: Bus) -> dict[str, list[KvMessage]]:
    """``kv_log`` of the rollouts and the desired bucket, by bucket."""
    return {bucket: await kv_log(bus, bucket) for bucket in fenced_logs_of(bus.fleet)}


@contextlib.asynccontextmanager
async def kv_landed(bus: Bus) -> AsyncIterator[dict[str, list[KvMessage]]]:
    """Every message stored in the rollouts and desired buckets while the block runs (from the
    start of their streams), by bucket: an ordered consumer each, so that a write a later one
    pushes out of the bucket's history (5 per key) is still seen. Ends with what the streams
    hold at the block's end (by sequence, nothing twice)."""
    landed: dict[str, dict[int, KvMessage]] = {}
    subs = []
    for bucket in fenced_logs_of(bus.fleet):
        got = landed.setdefault(bucket, {})

        async def record(msg: Any, got: dict[int, KvMessage] = got) -> None:
            got[msg.metadata.sequence.stream] = (msg.metadata.sequence.stream, msg.subject,
                                                 msg.data or b"")

        subs.append(await bus.js.subscribe(f"$KV.{bucket}.>", stream=f"KV_{bucket}", cb=record,
                                           ordered_consumer=True))
    out: dict[str, list[KvMessage]] = {}
    try:
        yield out
    finally:
        for sub in subs:
            await sub.unsubscribe()
    for bucket, held in (await kv_logs(bus)).items():
        got = landed[bucket]
        for m in held:
            got.setdefault(m[0], m)
        out[bucket] = [got[seq] for seq in sorted(got)]


class Termed(msgspec.Struct):
    """The lease term in any value a leader writes to the rollouts bucket."""

    term: int


def assert_fenced_off(logs: dict[str, list[KvMessage]], term: int,
                      fleet: str = "default") -> dict[str, int]:
    """In each of the rollouts and desired buckets' logs (``kv_log`` or ``kv_landed``, by
    bucket), every write after the fence marker of ``term`` carries ``term`` or a higher one:
    no write of a deposed leader landed. The number of such writes per bucket (each > 0: the
    new leader wrote there)."""
    terms: dict[str, Callable[[bytes], int]] = {
        # records, their pages (deflated) and the history beside them (indexes, reduced
        # records): each has a term
        subjects.rollouts_bucket(fleet): lambda data: decode(Termed, unpack_page(data)).term,
        subjects.desired_bucket(fleet): lambda data: decode(SignedEnvelope, data).term,
    }
    assert set(logs) == set(terms), f"logs of {sorted(logs)}, not of {sorted(terms)}"
    counted = {}
    for bucket, messages in logs.items():
        term_of = terms[bucket]
        fences = [seq for seq, subject, data in messages if subject.endswith(
            "." + subjects.FENCE_KEY) and data and decode(FenceMarker, data).term == term]
        assert fences, f"no fence of term {term} in {bucket}'s log"
        late = [(seq, subject, term_of(data)) for seq, subject, data in messages
                if seq > fences[0] and data and not subject.endswith("." + subjects.FENCE_KEY)]
        assert late, f"the leader of term {term} wrote nothing to {bucket}"
        older = [m for m in late if m[2] < term]
        assert not older, f"writes of an older term landed in {bucket} after term {term}'s " \
                          f"fence: {older}"
        counted[bucket] = len(late)
    return counted


# -- webhook receivers ---------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on ``host``: answers each POST after ``delay`` with the next status of
    ``first`` per event id (then 200); keeps the accepted deliveries with their arrival time."""

    host: str
    delay: float = 0.0
    first: list[int] = field(default_factory=list)
    posts: int = 0
    accepted: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    tries: dict[str, int] = field(default_factory=dict)
    port: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook?token=not-in-logs"

    def reserve(self) -> None:
        """Pick a free port without listening on it yet (a receiver that is down)."""
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.strip(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers["Content-Length"]))
            arrived = time.time()
            self.posts += 1
            event = headers.get("X-Fleetwave-Event", "")
            tried = self.tries.get(event, 0)
            self.tries[event] = tried + 1
            status = self.first[tried] if tried < len(self.first) else 200
            await asyncio.sleep(self.delay)
            if status == 200:
                self.accepted.append((arrived, headers, body))
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                         .encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, body in self.accepted]


@contextlib.asynccontextmanager
async def receivers(*rs: Receiver) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for r in rs:
            await r.stop()
