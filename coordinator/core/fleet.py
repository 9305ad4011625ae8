"""The coordinator's node table: who is in the fleet, who is alive, what each one runs.

Theory of operation: a pure state machine fed with what arrives on the bus and the time it
arrived. ``register`` takes an agent's NodeInfo, ``heartbeat`` its periodic Heartbeat, ``tick``
lets time pass; each returns the *transitions* it caused (a node came online or went offline),
which the daemon turns into events. Nothing here awaits or reads a clock: ``now`` is always given,
so tests run in virtual time.

Vocabulary: a node is *online* while its last sign of life is at most ``MISSED_BEATS`` of its own
announced heartbeat intervals old (3 missed heartbeats make it offline). The time of a sign of life
is the coordinator's receive time, never the agent's clock, so a skewed agent clock cannot make a
node look alive or dead. Nodes loaded from the nodes bucket at start are known but not online
until they beat; until ``listen``'s time has passed (the daemon gives its startup grace: a paced
interval can be 25 s) one not heard from yet is shown as *not heard yet* (``NodeView.unheard``),
not offline: a coordinator that has just started cannot know. While the coordinator itself
cannot hear (its NATS connection is down), silence is no evidence: ``excuse(until)`` counts
every node as heard from at ``until`` at the latest, so a broker restart does not make the whole
fleet "offline" (and fail every rollout under way).

Selectors are ``{label: value}`` maps; a node matches when it carries every pair (an empty
selector matches every node).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from protocol.codec import to_builtins
from protocol.errors import ProtocolError
from protocol.messages import FEATURE_BATCH, Heartbeat, NodeInfo, NodeView

MISSED_BEATS = 3
# Bounds on an announced interval: a hostile or buggy agent must not be able to stay "online" for
# a year after one heartbeat, nor flap offline between two heartbeats a microsecond apart.
MIN_INTERVAL = 0.05
MAX_INTERVAL = 300.0
DEFAULT_INTERVAL = 2.0
PACE_MEMORY = 600.0  # a node offline this recently still counts in the pace (``Fleet.beating``)

_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}\Z")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.-]{1,63}\Z")

TransitionKind = Literal["node.online", "node.offline"]


@dataclass(frozen=True)
class Transition:
    """A node changed state; the daemon publishes it as an Event of the same ``kind``."""

    kind: TransitionKind
    node: str
    message: str
    data: dict[str, object] = field(default_factory=dict)


@dataclass
class NodeRecord:
    """Everything the coordinator knows about one node."""

    id: str
    info: NodeInfo | None = None
    heartbeat: Heartbeat | None = None
    last_seen: float | None = None
    online: bool = False

    @property
    def labels(self) -> dict[str, str]:
        """The registered labels, or those of the last heartbeat if the node never registered."""
        if self.info is not None:
            return self.info.labels
        return self.heartbeat.labels if self.heartbeat is not None else {}

    @property
    def interval(self) -> float:
        announced = self.heartbeat.interval if self.heartbeat is not None else DEFAULT_INTERVAL
        return clamp_interval(announced)

    def deadline(self) -> float | None:
        """When the node goes offline if nothing more is heard from it."""
        if self.last_seen is None:
            return None
        return self.last_seen + MISSED_BEATS * self.interval


def clamp_interval(interval: float) -> float:
    if math.isnan(interval):  # from a hostile heartbeat
        return DEFAULT_INTERVAL
    return min(max(interval, MIN_INTERVAL), MAX_INTERVAL)


class Fleet:
    """The node table of one fleet; every method takes ``now`` (Unix seconds) and never awaits."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        self.excused_until = 0.0  # see ``excuse``
        # No online node's deadline is earlier than this (a lower bound kept by every sign of
        # life, exact after each full scan): ``tick`` is O(1) until it is reached, so a fleet of
        # thousands costs nothing between heartbeats' deadlines.
        self._check_at = math.inf
        # ``nodes`` sorted by id (natural order), kept while no node is added: records are
        # added (``setdefault``) and removed only by ``forget``, which drops it. Sorting 50,000
        # ids by their natural key was 0.2 s of every ``nodes`` answer, the dashboard's page of
        # them included.
        self._sorted: list[NodeRecord] = []
        self._unheard: set[str] = set()  # see ``listen``
        self.online_count = 0  # kept by every transition
        self._went_offline: dict[str, float] = {}  # node -> when, while within ``beating``'s memory
        self.unheard_until = 0.0
        self._unheard_grace = 0.0
        # Moved by every change of what ``liveness`` answers for some node (a node known,
        # forgotten, online, offline, no longer *not heard yet*), never by a heartbeat of an
        # online node: a reader that saw everything consistent at one count need not look at
        # every node again while it stays (the runner's tick, O(fleet) at every look).
        self.changes = 0

    def load(self, info: NodeInfo) -> None:
        """Know a node from the nodes bucket (at start): not online until it beats."""
        if info.id not in self.nodes:
            self.changes += 1
        rec = self.nodes.setdefault(info.id, NodeRecord(info.id))
        rec.info = info

    def listen(self, now: float, grace: float) -> None:
        """Every known node not heard from yet is *not heard yet* rather than offline for
        ``grace`` seconds from ``now`` (when ``tick`` passes that, those still silent are
        offline), and as long again after the coordinator could not hear (``excuse``): one
        that has just started showed a fleet of live nodes all offline for a paced interval."""
        self.unheard_until = now + grace
        self._unheard_grace = grace
        self._unheard = {r.id for r in self.nodes.values() if r.last_seen is None}
        self.changes += 1

    def forget(self, node_id: str) -> bool:
        """Drop a node from the table (``fleetwave forget``: an offline node decommissioned);
        False if it was not known, or is online (its agent came back meanwhile: it stays).
        One that beats again later is a new node."""
        rec = self.nodes.get(node_id)
        if rec is None or rec.online:
            return False
        del self.nodes[node_id]
        self.changes += 1
        self._unheard.discard(node_id)
        self._went_offline.pop(node_id, None)
        self._sorted = []  # (its length alone no longer says it is current)
        return True

    def offline_ids(self, most: int) -> list[str]:
        """Up to ``most`` offline nodes (not *not heard yet*), those offline longest first."""
        gone = [r for r in self.nodes.values() if not r.online and r.id not in self._unheard]
        gone.sort(key=lambda r: r.last_seen or 0.0)
        return [r.id for r in gone[:most]]

    def register(self, info: NodeInfo, now: float) -> list[Transition]:
        """An agent (re)connected and announced itself: a sign of life."""
        rec = self.nodes.setdefault(info.id, NodeRecord(info.id))
        rec.info = info
        return self._alive(rec, now, "registered")

    def heartbeat(self, hb: Heartbeat, now: float) -> list[Transition]:
        """A heartbeat arrived at ``now``."""
        rec = self.nodes.setdefault(hb.node, NodeRecord(hb.node))
        rec.heartbeat = hb  # may announce a shorter interval: _alive lowers _check_at
        return self._alive(rec, now, "heartbeat")

    def liveness(self, node_id: str) -> tuple[bool, bool] | None:
        """(online, known: heard from, or no longer *not heard yet*) of one node, None if
        unknown: the runner's O(1) lookup, for which this table's window (``listen``) is the
        startup grace."""
        rec = self.nodes.get(node_id)
        if rec is None:
            return None
        return rec.online, rec.last_seen is not None or rec.id not in self._unheard

    def takes_batch_signatures(self, node_id: str) -> bool:
        """Whether the node's agent said it verifies batch-signed desired states."""
        rec = self.nodes.get(node_id)
        return rec is not None and rec.info is not None and FEATURE_BATCH in rec.info.features

    def tick(self, now: float) -> list[Transition]:
        """Let time pass: every online node whose deadline is behind ``now`` goes offline."""
        out: list[Transition] = []
        if self._unheard and now >= self.unheard_until:
            self._unheard = set()  # (they were never online: no transition)
            self.changes += 1
        if now <= self._check_at:
            return out
        check_at = math.inf
        for rec in self.nodes.values():
            deadline = self._deadline(rec)
            if not rec.online or deadline is None:
                continue
            if now <= deadline:
                check_at = min(check_at, deadline)
            else:
                rec.online = False
                self.changes += 1
                self.online_count -= 1
                self._went_offline[rec.id] = now
                silent = now - (rec.last_seen or now)
                out.append(
                    Transition(
                        "node.offline",
                        rec.id,
                        f"node {rec.id} is offline: no heartbeat for {silent:.1f}s "
                        f"({MISSED_BEATS} x {rec.interval:g}s missed)",
                        {"last_seen": rec.last_seen, "interval": rec.interval},
                    )
                )
        self._check_at = check_at
        return out

    def next_deadline(self) -> float | None:
        """The earliest time at which ``tick`` could change something (None: nothing pending)."""
        deadlines = [d for r in self.nodes.values()
                     if r.online and (d := self._deadline(r)) is not None]
        return min(deadlines, default=None)

    def excuse(self, until: float, *, deaf: bool = True) -> None:
        """The coordinator could not hear the fleet until ``until`` (it was disconnected, and
        agents reconnect with backoff): no online node goes offline for silence before then,
        and a node not heard yet has its grace again from then. ``deaf=False``: it could hear,
        but the nodes may be silent until then (the leader lengthened their pace); a node not
        heard yet keeps its window."""
        self.excused_until = max(self.excused_until, until)
        if deaf and self._unheard:
            self.unheard_until = max(self.unheard_until, until + self._unheard_grace)

    def _deadline(self, rec: NodeRecord) -> float | None:
        deadline = rec.deadline()
        if deadline is None:
            return None
        return max(deadline, self.excused_until + MISSED_BEATS * rec.interval)

    def view(self, selector: Mapping[str, str] | None = None, *,
             services: bool = True) -> list[NodeView]:
        """The rows of ``fleetwave nodes``: nodes matching ``selector``, sorted by id;
        ``services=False``: without their figures and services (what a rollout's planning
        reads: id, labels, online), a tenth of the work at 10,000 nodes."""
        return [_row(rec, services, rec.id in self._unheard) for rec in self._matching(selector)]

    def page(self, selector: Mapping[str, str] | None, most: int,
             ahead: Collection[str] = ()) -> tuple[list[NodeView], int, int, int]:
        """At most ``most`` rows of ``view``: the offline nodes and those in ``ahead`` first,
        then by id, shown by id; with how many nodes match, how many of them are online and
        how many not heard yet (``listen``). Rows are built for the nodes shown only (a
        dashboard of 50,000 nodes polls this)."""
        recs = self._matching(selector)
        unheard = self._unheard
        first = [r.id for r in recs
                 if (not r.online and r.id not in unheard) or r.id in ahead][:most]
        if len(first) < most:
            taken = set(first)
            first += [r.id for r in recs if r.id not in taken][:most - len(first)]
        chosen = set(first)
        rows = [_row(r, True, r.id in unheard) for r in recs if r.id in chosen]
        return (rows, len(recs), sum(r.online for r in recs),
                sum(r.id in unheard for r in recs) if unheard else 0)

    def _matching(self, selector: Mapping[str, str] | None) -> list[NodeRecord]:
        if len(self._sorted) != len(self.nodes):
            self._sorted = sorted(self.nodes.values(), key=lambda r: _natural_key(r.id))
        if not selector:
            return list(self._sorted)
        return [rec for rec in self._sorted if matches(selector, rec.labels)]

    def unheard(self, selector: Mapping[str, str] | None = None) -> list[str]:
        """Ids of the nodes matching ``selector`` that are *not heard yet* (``listen``), in no
        order: O(them), what a deploy waits for (``runtime.runner``)."""
        return [n for n in self._unheard
                if not selector or matches(selector, self.nodes[n].labels)]

    def beating(self, now: float, memory: float = PACE_MEMORY) -> int:
        """How many nodes may beat: the online ones, those not heard yet, and those offline for
        less than ``memory``; what the leader paces (``core.pace``). Nodes offline for longer do
        not beat: a fleet that keeps 20,000 dead boxes among 50,000 known would otherwise beat
        40 % slower than it needs to, and be judged offline that much later. The recent ones
        still count: a leader too busy to hear some beats (nodes "offline" that are not) must
        not shorten every node's pace, and make itself busier. O(nodes gone offline lately)."""
        for node, at in list(self._went_offline.items()):
            if at < now - memory:
                del self._went_offline[node]
        return self.online_count + len(self._unheard) + len(self._went_offline)

    def online_ids(self, selector: Mapping[str, str] | None = None) -> list[str]:
        """Ids of the online nodes matching ``selector`` (what a rollout may target)."""
        return [v.id for v in self.view(selector) if v.online]

    def _alive(self, rec: NodeRecord, now: float, why: str) -> list[Transition]:
        if rec.last_seen is None or not rec.online:  # (a new record is both)
            self.changes += 1
        rec.last_seen = now
        self._unheard.discard(rec.id)
        self._check_at = min(self._check_at, now + MISSED_BEATS * rec.interval)
        if rec.online:
            return []
        rec.online = True
        self.online_count += 1
        self._went_offline.pop(rec.id, None)
        return [
            Transition(
                "node.online",
                rec.id,
                f"node {rec.id} is online ({why})",
                {"labels": dict(rec.labels)},
            )
        ]


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when ``labels`` carries every ``key=value`` of ``selector``."""
    return all(labels.get(k) == v for k, v in selector.items())


def parse_selector(items: Iterable[str], *, what: str = "selector") -> dict[str, str]:
    """Turn ``["zone=a", "role=web,tier=1"]`` into a dict; ProtocolError names the bad item."""
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ProtocolError(
                    f"{what} {part.strip()!r} is not key=value; write e.g. 'zone=a' (keys and "
                    "values: letters, digits, '-', '_', '.')"
                )
            if key in out and out[key] != value:
                raise ProtocolError(
                    f"{what} names {key!r} twice ({out[key]!r} and {value!r}); keep one"
                )
            out[key] = value
    return out


def _natural_key(node_id: str) -> tuple[object, ...]:
    """Sort node-2 before node-10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", node_id))


def _row(rec: NodeRecord, services: bool = True, unheard: bool = False) -> NodeView:
    if not services:
        return NodeView(id=rec.id, labels=dict(rec.labels), online=rec.online,
                        last_seen=rec.last_seen, unheard=unheard)
    hb = rec.heartbeat
    return NodeView(
        id=rec.id,
        labels=dict(rec.labels),
        online=rec.online,
        unheard=unheard,
        last_seen=rec.last_seen,
        cpu_percent=hb.cpu_percent if hb is not None else None,
        mem_percent=hb.mem_percent if hb is not None else None,
        services={s.service: to_builtins(s) for s in hb.services} if hb else {},
    )
