"""The heartbeat pace: how often the leader lets agents beat, so that one coordinator hears at
most ``rate`` heartbeats a second however large the fleet grows.

Theory of operation: every agent beats at its own ``--heartbeat-interval`` (2 s by default).
50,000 of them would be 25,000 messages a second into every coordinator, which one Python process
on a small host cannot take: measured on the project's 2-core machine, an idle coordinator of
50,000 simulated nodes at 2 s spent 94 % of a core on heartbeats alone, the server cut it off as a
slow consumer and it lost its lease five times in two minutes. As Nomad's servers stretch each
client's heartbeat TTL to keep ``max_heartbeats_per_second``, the leader tells every agent the
interval ``nodes / rate`` (``messages.Pace`` on ``subjects.pace``), and an agent beats at the
longer of that and its own (``agent.presence.Pacing``), announcing it in its heartbeats. Liveness
is still judged per node by the interval it announced (``core.fleet``: 3 missed beats): a fleet of
10,000 at 2,000 a second beats every 5 s and a node is offline 15 s after its last beat.

The pace also names the services whose running rollouts read the routers' counters
(``reading``, ``reads_counters``): their agents report every read of their routers, while the
others report counters alone once a paced interval (``agent.manager.observed``), so that at rest
the coordinator takes as many reports as heartbeats, and a rollout's gates compare windows of
fresh counters from every node, the old slots' as well as the new.

``Pacer.due`` says when to publish: at once when the interval moved by more than ``CHANGE`` (the
fleet grew or shrank) or the services read changed, ``HOLD`` after registrations were first seen
(an agent that just started beats at its own interval until it hears the pace; held a moment so
that a burst of them is counted first), and every ``REPEAT`` s anyway (a
core NATS message is not kept: an agent that was away meanwhile hears the next one); at most
once a ``SETTLE``, but for a change of the services read, said at once: the old release's
nodes report fresh counters before the first wave's baseline is taken (the leader wakes its
pace loop on each rollout event). Pure: the time is
given, so tests run in virtual time. The start or the end of a burst of registrations
(``burst``) is said at once too. When the interval grows, the leader excuses every node's
silence for one new interval (``Pacer.grace``): a lost announcing beat is no death.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from coordinator.core.fleet import MAX_INTERVAL, MISSED_BEATS
from protocol.messages import Pace, RolloutRecord, RolloutSpec

DEFAULT_RATE = 2000.0  # heartbeats a second: 4,000 nodes at the agents' default 2 s
CHANGE = 0.10  # a relative change of the interval that is published at once
REPEAT = 30.0
SETTLE = 1.0
# A pace said for newcomers (or a repeat or a moved interval due meanwhile) waits this long
# after the look that first saw them: at a fleet-wide restart the first registrations would
# otherwise be told "no burst" before the leader has counted enough of them to know (``burst``;
# measured: 20,000 agents heard a pace 0.4 s into their start that said none, and all watched
# at once).
HOLD = 0.5


def interval(nodes: int, rate: float) -> float:
    """The shortest interval at which ``nodes`` beat ``rate`` times a second at most."""
    return min(MAX_INTERVAL, round(nodes / rate, 3))


def reads_counters(spec: RolloutSpec) -> bool:
    """Whether a running rollout of ``spec`` reads its nodes' router counters: it bakes (its
    gates judge the bake's window), weighs evidence sequentially, or mirrors (a shadow)."""
    if spec.strategy == "remove":
        return False  # nothing serves to judge (its waves do not bake)
    return spec.bake > 0 or spec.gates.analysis == "sequential" or spec.strategy == "shadow"


def reads_now(record: RolloutRecord) -> bool:
    """Whether rollout ``record`` reads its nodes' counters now: it runs forward (not paused,
    not rolling back: its gates have spoken) with a spec that reads them, and is not past its
    last wave's gates (a blue-green's keep-warm window). Between two waves it still reads (the
    next wave's evidence starts at its start): un-naming the service there would make every
    node report again at each wave's start."""
    if record.state != "running" or record.phase != "forward" or not reads_counters(record.spec):
        return False
    waves = record.waves
    return not (waves and record.current_wave >= len(waves) - 1
                and waves[-1].state == "passed")


def startup_grace(nodes: int, rate: float, floor: float) -> float:
    """How long a coordinator that has just started holds back judging a node it has not heard
    from yet (``runtime.runner``: ``startup_grace``): ``floor``, or as long as a node is given
    after its last beat (``MISSED_BEATS`` paced intervals) when that is longer. It does not know
    their last beats: at 50,000 nodes paced every 25 s, a 10 s grace made a resumed rollout
    count most of the fleet lost between 10 and 25 s after a restart."""
    return max(floor, MISSED_BEATS * interval(nodes, rate))


class Pacer:
    """When the leader publishes the pace; see the module docstring."""

    def __init__(self, rate: float = DEFAULT_RATE) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"a heartbeat rate must be positive, not {rate!r}")
        self.rate = rate
        self.sent: Pace | None = None
        self._at = -math.inf
        self._newcomers_seen: float | None = None  # the look that first saw them (``HOLD``)

    def due(self, now: float, nodes: int, newcomers: bool,
            reading: Iterable[str] | None = (), burst: bool = False) -> Pace | None:
        """The Pace to publish now for a fleet of ``nodes`` (``newcomers``: some registered since
        the last one was sent) whose running rollouts read the counters of ``reading``'s
        services (None: not known yet, agents keep what they were told), with ``burst``
        (registrations are coming in a burst: ``core.reconnects``), or None; ``published`` once
        it went out."""
        pace = Pace(interval=interval(nodes, self.rate), nodes=nodes, rate=self.rate,
                    reading=None if reading is None else sorted(set(reading)), burst=burst)
        if self.sent is None or pace.reading != self.sent.reading or pace.burst != self.sent.burst:
            # A rollout that reads counters started or ended, or a burst of registrations began
            # or ended (agents wait for it before their first watch): not held a SETTLE
            return pace
        if newcomers and self._newcomers_seen is None:
            self._newcomers_seen = now
        if now - self._at < SETTLE:
            return None
        if self._newcomers_seen is not None and now - self._newcomers_seen < HOLD:
            return None  # not a repeat nor a moved interval either: it would say "no burst" too
        if newcomers or now - self._at >= REPEAT or self.moved(pace):
            return pace
        return None

    def moved(self, pace: Pace) -> bool:
        """Whether ``pace`` differs from the last one sent by more than ``CHANGE``."""
        if self.sent is None:
            return True
        last = self.sent.interval
        return abs(pace.interval - last) > CHANGE * max(last, 1e-3)

    def grace(self, pace: Pace) -> float:
        """Seconds of silence to excuse every node when ``pace`` goes out: when it lengthens
        the interval, an agent announces it in one beat sent at once, and a node whose beat is
        lost (core NATS) would otherwise be judged by its old, shorter interval until the next
        beat on its new grid, up to ``pace.interval`` later (``core.fleet.Fleet.excuse``)."""
        last = 0.0 if self.sent is None else self.sent.interval
        return pace.interval if pace.interval > last else 0.0

    def published(self, now: float, pace: Pace) -> None:
        self.sent, self._at = pace, now
        self._newcomers_seen = None
