"""What the coordinator's ``/metrics`` says: the pure mapping from what it knows to samples.

Theory of operation: the gauges are computed at scrape time from the coordinator's state (its
node table, the rollout records it drives or reads), so they are never stale and need no
bookkeeping; the counters and histograms are fed from the rollout events as they are decided
(``coordinator.http.metrics``). This module holds both mappings as functions of plain data, so
tests need neither sockets nor a registry.

Vocabulary:

- the *shown* rollouts: every rollout that is not over, and the latest of each service (over or
  not). Per-rollout series (``fleetwave_rollout_*``, ``fleetwave_gate_*`` with a ``rollout``
  label) exist for those only, so the number of series stays bounded however long the history
  grows; ``fleetwave_rollouts`` counts the same set by service, strategy and state;
- the *set weight* of a rollout: the mean, over its target nodes, of the traffic share (percent)
  its desired state gives the new release on that node: 0 on a node not reached yet, rolled
  back or failed. A canary at ``--weights 5`` shows 5; a rolling rollout one node of four in
  shows 25; blue-green shows 0 until the switch, then 100. (The weight the routers actually
  apply is the agents' ``fleetwave_router_weight``.)
- the *gate figures* of a rollout: those of its latest evaluated wave, exactly as its record
  keeps them (``fleetwave status -o json``: ``waves[i].gates``);
- a *gate decision*: one per configured gate each time a wave's gates conclude (``gate.passed``,
  ``gate.failed``, ``gate.inconclusive``), its result read off the figures against the
  thresholds the event carries; ``gate="wave"`` counts a verdict no single threshold explains
  (sequential analysis, nodes whose figures were left out).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from protocol.messages import TERMINAL_STATES, Event, NodeView, RolloutRecord

Kind = Literal["gauge", "info"]
NODE_STATES = ("waiting", "updating", "done", "failed", "rolling_back", "rolled_back")
ROLLOUT_STATES = ("pending", "running", "paused", "succeeded", "rolled_back", "failed", "aborted")
DECIDED = {"gate.passed": "pass", "gate.failed": "fail", "gate.inconclusive": "inconclusive"}
FINISHED = {"rollout.succeeded": "succeeded", "rollout.rolled_back": "rolled_back",
            "rollout.aborted": "aborted", "rollout.failed": "failed"}

# name -> (help, label names): every gauge family, present (maybe empty) on every scrape.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fleetwave_rollouts": (
        "Rollouts in each state, of those shown: every one not over, and the latest per "
        "service", ("service", "strategy", "state")),
    "fleetwave_rollout_info": (
        "A shown rollout (1), its service, strategy, version and state",
        ("rollout", "service", "strategy", "version", "state")),
    "fleetwave_rollout_wave": ("The rollout's current wave, 1-based", ("rollout", "service")),
    "fleetwave_rollout_waves": ("The rollout's number of waves", ("rollout", "service")),
    "fleetwave_rollout_nodes": ("The rollout's target nodes in each state",
                                ("rollout", "service", "state")),
    "fleetwave_rollout_weight": (
        "Traffic share set for the new version, percent: the mean over target nodes",
        ("rollout", "service")),
    "fleetwave_gate_error_ratio": (
        "Error ratio (0-1) of the new or old slots in the latest evaluated wave's window",
        ("rollout", "service", "side")),
    "fleetwave_gate_p99_ratio": (
        "p99 latency of the new slots over the old ones in the latest evaluated wave's window",
        ("rollout", "service")),
    "fleetwave_gate_requests": (
        "Requests of the new or old slots in the latest evaluated wave's window",
        ("rollout", "service", "side")),
    "fleetwave_gate_healthy_ratio": (
        "Healthy share (0-1) of the latest evaluated wave's nodes", ("rollout", "service")),
    "fleetwave_nodes": (
        "Known nodes online, offline or not heard yet (a coordinator just started)", ("state",)),
    "fleetwave_node_up": ("Whether the node's heartbeats arrive (1) or not (0)", ("node",)),
    "fleetwave_node_label_info": ("One of the node's labels (1)", ("node", "label", "value")),
    "fleetwave_coordinator_leader": ("Whether this coordinator leads its fleet (1) or stands by",
                                     ()),
    "fleetwave_coordinator_info": ("This coordinator (1): its id, fleet and version",
                                   ("id", "fleet", "version")),
    "fleetwave_heartbeat_pace_seconds": (
        "The interval the leader paces the fleet's heartbeats at: the nodes that beat / "
        "--max-heartbeats-per-second (agents beat at the longer of it and their own)", ()),
}


@dataclass(frozen=True)
class Sample:
    """One sample of a gauge family of ``GAUGES``; ``labels`` in the family's order."""

    name: str
    labels: tuple[str, ...]
    value: float


def shown(records: Iterable[RolloutRecord]) -> list[RolloutRecord]:
    """The rollouts the per-rollout series describe (see the module), newest first."""
    ordered = sorted(records, key=lambda r: (r.created, r.id), reverse=True)
    latest: set[str] = set()
    out = []
    for r in ordered:
        if r.state not in TERMINAL_STATES or r.spec.service not in latest:
            out.append(r)
        latest.add(r.spec.service)
    return out


def set_weight(r: RolloutRecord) -> float:
    """The rollout's set weight (see the module), percent."""
    if not r.nodes:
        return 0.0
    total = 0
    for p in r.nodes.values():
        t = p.target
        if p.state not in ("updating", "done") or t is None or p.slot not in t.slots:
            continue
        total += t.weights.get(p.slot, 100 if len(t.slots) == 1 else 0)
    return total / len(r.nodes)


def latest_gates(r: RolloutRecord) -> dict[str, Any] | None:
    """The gate figures of the rollout's latest evaluated wave, or None before any."""
    for w in reversed(r.waves):
        if "requests" in w.gates:
            return w.gates
    return None


def rollout_samples(records: Iterable[RolloutRecord]) -> list[Sample]:
    """The rollout and gate gauges of ``records``' shown rollouts."""
    out: list[Sample] = []
    counts: dict[tuple[str, str, str], int] = {}
    for r in shown(records):
        rid, svc = r.id, r.spec.service
        key = (svc, r.spec.strategy, r.state)
        counts[key] = counts.get(key, 0) + 1
        out.append(Sample("fleetwave_rollout_info",
                          (rid, svc, r.spec.strategy, r.release.version, r.state), 1))
        if r.waves:
            wave = min(r.current_wave, len(r.waves) - 1)
            out.append(Sample("fleetwave_rollout_wave", (rid, svc), wave + 1))
        out.append(Sample("fleetwave_rollout_waves", (rid, svc), len(r.waves)))
        states = dict.fromkeys(NODE_STATES, 0)
        for p in r.nodes.values():
            states[p.state] = states.get(p.state, 0) + 1
        out += [Sample("fleetwave_rollout_nodes", (rid, svc, s), n) for s, n in states.items()]
        out.append(Sample("fleetwave_rollout_weight", (rid, svc), set_weight(r)))
        out += gate_samples(rid, svc, latest_gates(r))
    out += [Sample("fleetwave_rollouts", key, n) for key, n in sorted(counts.items())]
    return out


def gate_samples(rid: str, svc: str, gates: Mapping[str, Any] | None) -> list[Sample]:
    """The figures of one rollout's latest evaluated wave; a figure it lacks has no sample
    (no traffic is no error ratio of 0)."""
    if gates is None:
        return []
    out: list[Sample] = []
    for name, labels, key in (
        ("fleetwave_gate_error_ratio", (rid, svc, "new"), "error_rate"),
        ("fleetwave_gate_error_ratio", (rid, svc, "old"), "old_error_rate"),
        ("fleetwave_gate_p99_ratio", (rid, svc), "p99_ratio"),
        ("fleetwave_gate_requests", (rid, svc, "new"), "requests"),
        ("fleetwave_gate_requests", (rid, svc, "old"), "old_requests"),
        ("fleetwave_gate_healthy_ratio", (rid, svc), "healthy_fraction"),
    ):
        value = gates.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(Sample(name, labels, float(value)))
    return out


def node_samples(views: Sequence[NodeView]) -> list[Sample]:
    """The node gauges of the coordinator's node table."""
    online = sum(1 for v in views if v.online)
    unheard = sum(1 for v in views if v.unheard)
    out = [Sample("fleetwave_nodes", ("online",), online),
           Sample("fleetwave_nodes", ("offline",), len(views) - online - unheard),
           Sample("fleetwave_nodes", ("unheard",), unheard)]
    for v in sorted(views, key=lambda v: v.id):
        if not v.unheard:  # not known yet either way: "nodes down" must not count it
            out.append(Sample("fleetwave_node_up", (v.id,), 1 if v.online else 0))
        out += [Sample("fleetwave_node_label_info", (v.id, k, x), 1)
                for k, x in sorted(v.labels.items())]
    return out


def coordinator_samples(id: str, fleet: str, version: str, leader: bool,
                        pace: float = 0.0) -> list[Sample]:
    return [Sample("fleetwave_coordinator_leader", (), 1 if leader else 0),
            Sample("fleetwave_coordinator_info", (id, fleet, version), 1),
            Sample("fleetwave_heartbeat_pace_seconds", (), pace)]


# -- from events ---------------------------------------------------------------------------------


def gate_decisions(event: Event) -> list[tuple[str, str]]:
    """(gate, result) of every configured gate in a ``gate.passed|failed|inconclusive`` event
    (see the module); [] for any other event."""
    overall = DECIDED.get(event.kind)
    if overall is None:
        return []
    data = event.data
    limits = data.get("thresholds")
    limits = limits if isinstance(limits, dict) else {}
    out = per_gate(data, limits)
    results = {r for _, r in out}
    explained = (overall == "pass" and results <= {"pass"}) or overall in results
    if not explained:
        out.append(("wave", overall))
    return out


def per_gate(data: Mapping[str, Any], limits: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Each configured threshold's own result on the figures in ``data`` (threshold analysis:
    ``coordinator.core.gates.evaluate``, whose rules these mirror)."""
    def num(key: str) -> float | None:
        v = data.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def limit(key: str) -> float | None:
        v = limits.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    out: list[tuple[str, str]] = []
    requests = num("requests") or 0.0
    min_requests = limit("min_requests")
    enough = requests > 0 and (min_requests is None or requests >= min_requests)
    if (x := limit("min_healthy")) is not None:
        out.append(("min_healthy", "fail" if (num("healthy_fraction") or 0.0) < x else "pass"))
    if min_requests is not None:
        out.append(("min_requests", "pass" if requests >= min_requests else "inconclusive"))
    if (x := limit("max_error_rate")) is not None:
        rate = num("error_rate") or 0.0
        out.append(("error_rate", "inconclusive" if not enough else
                    "fail" if rate > x else "pass"))
    if (x := limit("max_p99_ratio")) is not None:
        ratio = num("p99_ratio")
        out.append(("p99_ratio", "inconclusive" if not enough or ratio is None else
                    "fail" if ratio > x else "pass"))
    if (x := limit("max_mismatch_rate")) is not None:
        mismatch = num("mismatch_rate")
        compared = num("compared") or 0.0
        short = min_requests is not None and compared < min_requests
        out.append(("mismatch_rate", "inconclusive" if short or mismatch is None else
                    "fail" if mismatch > x else "pass"))
    return out


def finished(event: Event, record: RolloutRecord | None) -> tuple[str, str, float] | None:
    """(strategy, result, seconds from creation) of a rollout that ended with ``event``."""
    result = FINISHED.get(event.kind)
    if result is None or record is None or not record.created:
        return None
    return record.spec.strategy, result, max(0.0, event.time - record.created)
