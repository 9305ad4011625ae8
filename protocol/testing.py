"""The testing kit: fakes of the ports and builders of wire messages, for tests of every package.

- ``FakeBus``    just enough of ``protocol.bus.Bus`` in memory: KV buckets with revisions,
                 compare-and-set and wildcards, a watch, JetStream publishing, and faults injected
                 per (operation, bucket).
- ``FakeClock``  a clock that moves only when a test moves it (``clock.t += 5``).
- builders       ``OLD`` and ``NEW`` releases of the service ``hello``; ``desired`` (a node on a
                 release, as a rollout finds it), ``spec`` (a rollout spec), ``report`` (an agent
                 converged on a desired state), ``histogram`` and ``router_stats`` (a router's
                 counters).

Data only, like the rest of ``protocol``: no pytest, no ``agent``, no ``coordinator``. The
coordinator's own helpers over its engine (``rollout()``, ``writes()``, ...) live beside its tests.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import subjects
from protocol.bus import FENCED_IN_FLIGHT, Entry
from protocol.codec import decode
from protocol.errors import BusError, Conflict
from protocol.history import RolloutPage, assemble, unpack_page
from protocol.messages import (
    LATENCY_BOUNDS_MS,
    DesiredState,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
    RouterStats,
    SignedEnvelope,
    SlotStatus,
    SlotTraffic,
)

FLEET = "f"
SERVICE = "hello"
OLD = ReleaseRef(service=SERVICE, version="1.0.0", digest="sha256:old")
NEW = ReleaseRef(service=SERVICE, version="2.0.0", digest="sha256:new")
BUCKETS = len(LATENCY_BOUNDS_MS) + 1  # latency histogram buckets, the last one unbounded
PUBLISH = "publish"  # the fault key of JetStream publishing: faults[(PUBLISH, PUBLISH)]


@dataclass
class FakeBus:
    """Just enough JetStream KV: revisions, compare-and-set, wildcards, and injected faults.

    ``faults[(op, bucket)] = exc`` raises ``exc`` from that operation (``get``, ``put``,
    ``create``, ``update``, ``delete``, ``entries``; ``(PUBLISH, PUBLISH)`` for events)
    ``fault_count[(op, bucket)]`` times (once if not given).
    """

    fleet: str = FLEET
    max_payload: int = 0  # unknown: the record's size is not checked
    fenced_in_flight: int = FENCED_IN_FLIGHT  # as one server (``Bus.fenced_in_flight``)
    connected: bool = True
    reconnected_at: float | None = None  # the wall clock at the last reconnect (Bus's)
    kv: dict[str, dict[str, Entry]] = field(default_factory=dict)
    seq: int = 0
    log: list[tuple[str, str, str, bytes | None]] = field(default_factory=list)
    published: list[tuple[str, bytes]] = field(default_factory=list)
    faults: dict[tuple[str, str], BaseException] = field(default_factory=dict)
    fault_count: dict[tuple[str, str], int] = field(default_factory=dict)
    # ``ping``: what a ping of a subject answers (True answered, False no responders, None no
    # answer in time); a subject not listed answers True.
    pings: dict[str, bool | None] = field(default_factory=dict)
    kept: dict[tuple[str, str], list[Entry]] = field(default_factory=dict)  # every revision
    subscriptions: list[str] = field(default_factory=list)  # core subscriptions open now
    # As ``Bus``: the subjects a server refused a subscription to, and an event set with each.
    refused_subscriptions: set[str] = field(default_factory=set)
    subscription_refused: asyncio.Event = field(default_factory=asyncio.Event)

    def refused_subscription(self, subject: str) -> bool:
        return subject.lower() in self.refused_subscriptions

    def forgive(self, subject: str) -> None:
        self.refused_subscriptions.discard(subject.lower())

    def _fault(self, op: str, bucket: str) -> None:
        key = (op, bucket)
        if key in self.faults and self.fault_count.get(key, 1) > 0:
            self.fault_count[key] = self.fault_count.get(key, 1) - 1
            raise self.faults[key]

    def set(self, op: str, bucket: str, key: str, value: bytes | None) -> int:
        """Store ``value`` (None: a delete marker) under a new revision, and log it."""
        self.seq += 1
        self.kv.setdefault(bucket, {})[key] = Entry(key, value, self.seq)
        self.kept.setdefault((bucket, key), []).append(Entry(key, value, self.seq))
        self.log.append((op, bucket, key, value))
        return self.seq

    def live(self, bucket: str, key: str) -> Entry | None:
        e = self.kv.get(bucket, {}).get(key)
        return e if e is not None and e.value is not None else None

    async def kv_get(self, bucket: str, key: str) -> Entry | None:
        self._fault("get", bucket)
        return self.live(bucket, key)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        self._fault("put", bucket)
        return self.set("put", bucket, key, value)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int:
        self._fault("create", bucket)
        if self.live(bucket, key) is not None:
            raise Conflict(f"{bucket}/{key} already exists")
        return self.set("create", bucket, key, value)

    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int:
        self._fault("update", bucket)
        e = self.kv.get(bucket, {}).get(key)
        if e is None or e.revision != last:
            raise Conflict(f"{bucket}/{key} changed under us")
        return self.set("update", bucket, key, value)

    async def kv_delete(self, bucket: str, key: str, last: int | None = None) -> None:
        self._fault("delete", bucket)
        e = self.kv.get(bucket, {}).get(key)
        if last is not None and (e is None or e.revision != last):
            raise Conflict(f"{bucket}/{key} changed under us")
        self.set("delete", bucket, key, None)

    async def kv_history(self, bucket: str, key: str) -> list[Entry]:
        """Every revision of ``key`` (the fake keeps them all), oldest first."""
        self._fault("history", bucket)
        return list(self.kept.get((bucket, key), []))

    async def kv_entries(self, bucket: str, pattern: str = ">") -> list[Entry]:
        self._fault("entries", bucket)
        glob = pattern.replace(">", "*")
        return [e for k, e in sorted(self.kv.get(bucket, {}).items())
                if e.value is not None and fnmatch.fnmatchcase(k, glob)]

    async def kv_scan(self, bucket: str, pattern: str = ">", *,
                      page: int = 500) -> AsyncIterator[list[Entry]]:
        entries = await self.kv_entries(bucket, pattern)
        for start in range(0, len(entries), page):
            yield entries[start:start + page]

    async def watch(self, bucket: str, pattern: str, *, verify: float | None = None,
                    on_missing: Callable[[], Awaitable[None]] | None = None,
                    ) -> AsyncIterator[Entry | None]:
        for e in await self.kv_entries(bucket, pattern):
            yield e
        yield None

    async def ensure_observed(self) -> None:
        """The real one makes a missing memory bucket; here every bucket always exists."""

    async def kv_purge_keys(self, bucket: str, pattern: str) -> None:
        """Drop every key matching ``pattern`` (the real purge leaves no marker)."""
        self._fault("purge", bucket)
        glob = pattern.replace(">", "*")
        for key in [k for k in self.kv.get(bucket, {}) if fnmatch.fnmatchcase(k, glob)]:
            del self.kv[bucket][key]

    async def kv_update_all(self, bucket: str, writes: Sequence[tuple[str, bytes, int]], *,
                            timeout: float = 5.0) -> list[int | BusError]:
        """One kv_update per write, in order; a BusError is that write's result (as the real
        pipelined batch reports it), anything else ends the batch there."""
        out: list[int | BusError] = []
        for key, value, last in writes:
            try:
                out.append(await self.kv_update(bucket, key, value, last))
            except BusError as exc:
                out.append(exc)
        return out

    async def kv_fenced_all(self, bucket: str, writes: Sequence[tuple[str, bytes | None]],
                            fence: int, *, timeout: float = 5.0,
                            rollup: Collection[str] = (), atomic: bool = True,
                            ) -> list[int | BusError]:
        """Each write (a None value: a delete) only while the bucket's fence key is at revision
        ``fence`` (else a Conflict, as the server answers); an injected fault ("create" for a
        key not there, "update", "delete") is that write's result. The fake keeps no history,
        so a ``rollup`` is a plain write; its writes are one at a time, ``atomic`` or not."""
        out: list[int | BusError] = []
        for key, value in writes:
            op = ("delete" if value is None else "create" if self.live(bucket, key) is None
                  else "update")
            try:
                self._fault(op, bucket)
                marker = self.kv.get(bucket, {}).get(subjects.FENCE_KEY)
                if marker is None or marker.revision != fence:
                    raise Conflict(f"{bucket}: the fence moved (another leader)")
                out.append(self.set(op, bucket, key, value))
            except BusError as exc:
                out.append(exc)
        return out

    async def ping(self, subject: str, timeout: float) -> bool | None:
        return self.pings.get(subject, True)

    async def subscribe(self, subject: str, cb: Callable[[str, bytes], Awaitable[None]],
                        queue: str = "", *, pending_bytes: int = 0,
                        ) -> tuple[str, Callable[[str, bytes], Awaitable[None]]]:
        """A core subscription: remembered (``subscriptions``), never delivered to."""
        self.subscriptions.append(subject)
        return subject, cb

    async def unsubscribe(self, sub: tuple[str, object]) -> None:
        self.subscriptions.remove(sub[0])

    async def js_publish_events(self, messages: Sequence[tuple[str, bytes]], *,
                                timeout: float = 5.0) -> list[BusError | None]:
        """Store every message, or none of them while a publish fault is armed."""
        try:
            self._fault(PUBLISH, PUBLISH)
        except BusError as exc:
            return [exc] * len(messages)
        self.published.extend(messages)
        return [None] * len(messages)

    # -- reading what was written -----------------------------------------------------------------

    def desired(self, node: str, service: str = SERVICE) -> DesiredState | None:
        """The desired state stored for ``node`` (signature not checked), or None."""
        e = self.live(subjects.desired_bucket(self.fleet), subjects.node_service_key(node, service))
        if e is None or e.value is None:
            return None
        return decode(DesiredState, decode(SignedEnvelope, e.value).payload)

    def record(self, rid: str) -> RolloutRecord:
        """The rollout record stored under ``rid`` (AssertionError if there is none)."""
        bucket = subjects.rollouts_bucket(self.fleet)
        e = self.live(bucket, rid)
        assert e is not None and e.value is not None, f"no rollout record {rid}"
        top = decode(RolloutRecord, e.value)
        if not top.pages:
            return top
        pages = [decode(RolloutPage, unpack_page(p.value)) for k in range(top.pages)
                 if (p := self.live(bucket, f"{rid}.{k}")) is not None and p.value is not None]
        assert len(pages) == top.pages, f"rollout {rid}: pages missing"
        return assemble(top, pages)

    def desired_writes(self) -> list[tuple[str, int]]:
        """(key, generation) of every desired state written, in order."""
        bucket = subjects.desired_bucket(self.fleet)
        return [(k, decode(SignedEnvelope, v).generation) for _, b, k, v in self.log
                if b == bucket and v is not None]


class FakeClock:
    """A clock for ``clock=`` parameters: it reads ``t``, which only a test moves."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- builders --------------------------------------------------------------------------------------


def desired(node: str, *, generation: int = 7, release: ReleaseRef = OLD,
            fleet: str = FLEET) -> DesiredState:
    """``node`` serving ``release`` from slot a with all of the traffic (before a rollout)."""
    return DesiredState(fleet=fleet, node=node, service=release.service, generation=generation,
                        slots={"a": release}, weights={"a": 100})


def spec(**kw: Any) -> RolloutSpec:
    """A rollout of ``hello`` 2.0.0 (``NEW``) unless ``kw`` says otherwise, as for every field;
    a rolling one stages nothing ahead (``prestage="0"``) unless asked: the tests of a wave's
    own steps see them one by one, and pre-staging has tests of its own."""
    base = {"service": SERVICE, "version": NEW.version}
    if kw.get("strategy", "rolling") == "rolling":
        base["prestage"] = "0"
    return RolloutSpec(**(base | kw))


def report(d: DesiredState, t: float, router: RouterStats | None = None) -> ObservedState:
    """An agent converged on ``d`` at ``t``: every slot healthy, the positive weights applied."""
    return ObservedState(
        node=d.node, service=d.service, generation=d.generation,
        observed_generation=d.generation,
        slots={s: SlotStatus(slot=s, status="healthy", version=r.version)
               for s, r in d.slots.items()},
        weights={s: w for s, w in d.weights.items() if w > 0}, phase="converged", time=t,
        router=router)


def histogram(bucket: int, count: int) -> list[int]:
    """A latency histogram with ``count`` requests in ``bucket`` and none elsewhere."""
    h = [0] * BUCKETS
    h[bucket] = count
    return h


def router_stats(epoch: float = 1.0, at: float = 0.0,
                 **slots: tuple[int, int, int]) -> RouterStats:
    """A router's counters read at ``at``: per slot (requests, errors, latency bucket index)."""
    traffic = {s: SlotTraffic(requests=req, errors=err, latency=histogram(bucket, req))
               for s, (req, err, bucket) in slots.items()}
    return RouterStats(epoch=epoch, slots=traffic, time=at)
