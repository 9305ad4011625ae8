"""Router counters: cumulative since the router started (its epoch), mutated in place per request.

The proxy holds one ``SlotCounters`` per slot name (plus ``ROUTER_SLOT`` for the 503s it answers
when no slot may serve) and one ``MirrorCounters``; ``snapshot`` turns them into the wire
``RouterStats``. Counters are never reset while the process lives, so the coordinator can subtract
two snapshots of the same epoch (see ``protocol.histogram.delta``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque

from msgspec import UNSET

from protocol.cohort import HOW_ALLOW, HOW_ASSIGN, HOW_DENY, HOW_FALLBACK, HOW_KEY, sketch_add
from protocol.histogram import empty
from protocol.messages import (
    LATENCY_BOUNDS_MS,
    CohortTraffic,
    DrainPhase,
    MirrorTraffic,
    MismatchSample,
    RouterStats,
    SlotTraffic,
)

# Requests answered by the router itself because no slot could take them (503) are counted here.
ROUTER_SLOT = "router"
MAX_SAMPLES = 10


# Status classes by ``status // 100`` (index 0 and 1 unused: the router sends no final 1xx;
# anything above 599 counts as 5xx, as a client would read it).
CLASS_NAMES = ("", "", "2xx", "3xx", "4xx", "5xx")


class SlotCounters:
    """What one slot has served: requests (by status class), 5xx answers, connect failures,
    latency histogram and the sum of latencies (for a Prometheus histogram's ``_sum``)."""

    __slots__ = ("classes", "errors", "failures", "latency", "latency_sum", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.failures = 0
        self.latency = empty()
        self.latency_sum = 0.0
        self.classes = [0] * len(CLASS_NAMES)

    def observe(self, status: int, latency_ms: float) -> None:
        """Count one answered request (the hot path: a few increments, one bisect)."""
        self.requests += 1
        if status >= 500:
            self.errors += 1
            self.classes[5] += 1
        else:
            self.classes[status // 100] += 1
        self.latency[bisect_left(LATENCY_BOUNDS_MS, latency_ms)] += 1
        self.latency_sum += latency_ms

    def snapshot(self) -> SlotTraffic:
        return SlotTraffic(
            requests=self.requests,
            errors=self.errors,
            failures=self.failures,
            latency=list(self.latency),
            codes={CLASS_NAMES[i]: n for i, n in enumerate(self.classes) if n and i >= 2},
            latency_sum_ms=self.latency_sum,
        )


class MirrorCounters:
    """Shadow traffic: copies sent, compared, mismatched, dropped, failed; latencies; samples."""

    __slots__ = (
        "compared",
        "dropped",
        "live_latency",
        "mirrored",
        "mismatched",
        "samples",
        "shadow_errors",
        "shadow_latency",
    )

    def __init__(self) -> None:
        self.mirrored = 0
        self.compared = 0
        self.mismatched = 0
        self.dropped = 0
        self.shadow_errors = 0
        self.shadow_latency = empty()
        self.live_latency = empty()
        self.samples: deque[MismatchSample] = deque(maxlen=MAX_SAMPLES)  # the most recent

    def compared_pair(
        self, live_ms: float, shadow_ms: float, sample: MismatchSample | None
    ) -> None:
        """Count one comparison; ``sample`` is the mismatch, or None when they agreed."""
        self.compared += 1
        self.live_latency[bisect_left(LATENCY_BOUNDS_MS, live_ms)] += 1
        self.shadow_latency[bisect_left(LATENCY_BOUNDS_MS, shadow_ms)] += 1
        if sample is not None:
            self.mismatched += 1
            self.samples.append(sample)

    def snapshot(self) -> MirrorTraffic:
        return MirrorTraffic(
            mirrored=self.mirrored,
            compared=self.compared,
            mismatched=self.mismatched,
            dropped=self.dropped,
            shadow_errors=self.shadow_errors,
            shadow_latency=list(self.shadow_latency),
            live_latency=list(self.live_latency),
            samples=list(self.samples),
        )


class CohortCounters:
    """How the cohort rule decided (``CohortTraffic``): counts by how, and a users sketch per
    slot (``protocol.cohort.sketch_add``) since the rule's share last changed."""

    __slots__ = ("allowed", "assigned", "by_key", "denied", "fallback", "share", "users")

    def __init__(self) -> None:
        self.by_key = self.fallback = self.assigned = self.allowed = self.denied = 0
        self.users: dict[str, list[int]] = {}  # since the share last changed (``Proxy.apply``)
        self.share = -1

    def observe(self, how: str, slot: str, h: int) -> None:
        if how == HOW_KEY:
            self.by_key += 1
        elif how == HOW_ALLOW:
            self.allowed += 1
        elif how == HOW_DENY:
            self.denied += 1
        elif how == HOW_ASSIGN:
            self.assigned += 1
        elif how == HOW_FALLBACK:
            self.fallback += 1
        if h:
            sketch = self.users.get(slot)
            if sketch is None:
                sketch = self.users[slot] = []
            sketch_add(sketch, h)

    def snapshot(self) -> CohortTraffic:
        return CohortTraffic(
            by_key=self.by_key, fallback=self.fallback, assigned=self.assigned,
            allowed=self.allowed, denied=self.denied,
            users={slot: list(s) for slot, s in self.users.items()},
        )


def router_stats(
    *,
    epoch: float,
    pid: int,
    port: int | None,
    weights: dict[str, int],
    slots: dict[str, SlotCounters],
    mirror: MirrorCounters | None,
    cohort: CohortCounters | None = None,
    drain: DrainPhase = "",
    connections: int = 0,
) -> RouterStats:
    """The wire snapshot of everything counted so far; ``drain`` (with the open client
    connections) only while drained for maintenance."""
    return RouterStats(
        drain=drain or UNSET,
        connections=connections if drain else UNSET,
        epoch=epoch,
        pid=pid,
        port=port,
        weights=dict(weights),
        slots={name: c.snapshot() for name, c in slots.items()},
        mirror=mirror.snapshot() if mirror is not None else None,
        cohort=cohort.snapshot() if cohort is not None else UNSET,
    )
