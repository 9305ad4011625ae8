"""Evidence: which nodes' router figures may feed a wave's gates, and why the others may not.

The figures are each node's own word, so a buggy or compromised node could hide a bad
release's errors or invent some to force a rollback. ``distrust`` names what no real router can
report (a negative count, more errors than requests, a histogram that does not hold as many
requests as claimed or has the wrong number of buckets, a non-finite time, counters that went
backwards within one router epoch); such a node's figures are left out of every sum (``Evidence``)
and the verdict names it. Left out is not a pass: when a gate reads traffic, a node left out
makes a verdict that would pass inconclusive (the rollout pauses for an operator), while a
failure of the trusted figures still fails. So one node can at worst pause a rollout, never pass
a bad release nor roll back a good one. What ``distrust`` cannot catch is a consistent lie (clean
traffic invented in the right shape): the figures are only as honest as the nodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from protocol.durations import format_duration
from protocol.histogram import is_count
from protocol.histogram import problem as histogram_problem
from protocol.messages import RouterStats

_SLOT_COUNTERS = ("requests", "errors", "failures")
MIRROR_COUNTERS = ("mirrored", "compared", "mismatched", "dropped", "shadow_errors")
_MIRROR_HISTOGRAMS = ("shadow_latency", "live_latency")
# Reasons name this many untrusted nodes, then count the rest; figures keep MAX_LISTED of them
# with why, so that a fleet of liars cannot grow the rollout record past what the bus takes.
MAX_NAMED = 5
MAX_LISTED = 20


def distrust(start: RouterStats | None, end: RouterStats | None) -> str | None:
    """Why one node's router figures over the window ``start``..``end`` cannot be true, or None.

    ``start`` is judged only when the window reads it (same epoch); then every counter and
    bucket must have grown or stayed, since a router never resets its counters while it lives.
    """
    if end is None:
        return None
    why = _impossible(end)
    if why is not None:
        return why
    if start is None or start.epoch != end.epoch:
        return None
    why = _impossible(start)
    if why is not None:
        return f"at the window's start: {why}"
    return _backwards(start, end)


def short(start: RouterStats | None, end: RouterStats | None, bake: float) -> bool:
    """Whether one router's counters ``start``..``end`` were read less than ``bake`` apart (one
    clock per node: no skew between hosts matters). Unknown times (older agents), a missing
    snapshot or a restarted router cannot be waited for: not short."""
    if end is None or start is None or not end.time or not start.time:
        return False
    return start.epoch == end.epoch and end.time - start.time < bake


def unread(start: RouterStats | None, end: RouterStats | None, bake: float) -> str | None:
    """Why a new slot's counters do not cover a bake of ``bake`` seconds from ``start``, or
    None: a router that went away (the agent reports none) or counters that stopped moving.
    Its traffic is then unknown, not zero, and is left out like a lie (never a pass)."""
    if end is None:
        return "no router counters reported at the bake's end"
    if start is not None and short(start, end, bake):
        return (f"router counters read {end.time - start.time:g}s apart, less than the "
                f"{format_duration(bake)} bake")
    return None


def _impossible(stats: RouterStats) -> str | None:
    """What in one snapshot no router can report, or None."""
    for name in ("epoch", "time"):
        value = getattr(stats, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} {value!r} is not a finite time"
    for slot, traffic in sorted(stats.slots.items()):
        why = _not_counts(traffic, _SLOT_COUNTERS)
        if why is None and traffic.errors > traffic.requests:
            why = f"errors {traffic.errors} > requests {traffic.requests}"
        if why is None and (h := histogram_problem(traffic.latency, traffic.requests)):
            why = f"latency {h}"
        if why is not None:
            return f"slot {_label(slot)}: {why}"
    m = stats.mirror
    if m is None:
        return None
    why = _not_counts(m, MIRROR_COUNTERS)
    if why is None and m.mismatched > m.compared:
        why = f"mismatched {m.mismatched} > compared {m.compared}"
    for name in _MIRROR_HISTOGRAMS:
        if why is None and (h := histogram_problem(getattr(m, name), m.compared)):
            why = f"{name} {h}"
    return None if why is None else f"mirror: {why}"


def _not_counts(obj: object, names: Iterable[str]) -> str | None:
    for name in names:
        value = getattr(obj, name)
        if not is_count(value):
            return f"{name} {value!r} is " + ("negative" if isinstance(value, int)
                                               else "not a count")
    return None


def _backwards(start: RouterStats, end: RouterStats) -> str | None:
    """A counter or bucket of one router epoch that went down, a slot that vanished, or more
    errors than requests (mismatches than comparisons) over the window: each snapshot may hold
    and their difference not (100 requests with 0 errors, then 100 with 50)."""
    for slot, before in sorted(start.slots.items()):
        after = end.slots.get(slot)
        why = ("vanished within one router epoch" if after is None
               else _went_back(before, after, _SLOT_COUNTERS, ("latency",)))
        if why is None and after is not None and (
                after.errors - before.errors > after.requests - before.requests):
            why = (f"errors grew by {after.errors - before.errors}, requests by "
                   f"{after.requests - before.requests}, within one router epoch")
        if why is not None:
            return f"slot {_label(slot)}: {why}"
    if start.mirror is not None and end.mirror is not None:
        b, a = start.mirror, end.mirror
        why = _went_back(b, a, MIRROR_COUNTERS, _MIRROR_HISTOGRAMS)
        if why is None and a.mismatched - b.mismatched > a.compared - b.compared:
            why = (f"mismatched grew by {a.mismatched - b.mismatched}, compared by "
                   f"{a.compared - b.compared}, within one router epoch")
        if why is not None:
            return f"mirror: {why}"
    return None


def _went_back(
    before: object, after: object, counters: Iterable[str], histograms: Iterable[str],
) -> str | None:
    for name in counters:
        b, a = getattr(before, name), getattr(after, name)
        if a < b:
            return f"{name} went from {b} to {a} within one router epoch"
    for name in histograms:
        # Both are valid here: of equal length, or one empty and then its counter caught it.
        for i, (b, a) in enumerate(zip(getattr(before, name), getattr(after, name),
                                       strict=False)):
            if a < b:
                return f"{name} bucket {i} went from {b} to {a} within one router epoch"
    return None


def _label(name: str) -> str:
    """A node-chosen slot name, quoted and cut short enough for a reason line."""
    return repr(name if len(name) <= 32 else name[:32] + "...")


class Evidence:
    """Which nodes' router figures may feed a wave's gates; the others with why (``distrust``)."""

    def __init__(self) -> None:
        self.untrusted: dict[str, str] = {}

    def admits(self, node: str, start: RouterStats | None, end: RouterStats | None) -> bool:
        """Whether ``node``'s figures over ``start``..``end`` may be summed; if not, note why."""
        why = distrust(start, end)
        if why is None:
            return True
        self.untrusted.setdefault(node, why)
        return False

    def add(self, untrusted: Mapping[str, str]) -> None:
        """Nodes left out of figures gathered earlier (the blue-green switch's old traffic)."""
        for node, why in untrusted.items():
            self.untrusted.setdefault(node, why)


def listed(untrusted: Mapping[str, str]) -> dict[str, str]:
    """The first MAX_LISTED untrusted nodes with why, for figures and records."""
    return dict(sorted(untrusted.items())[:MAX_LISTED])


def left_out(untrusted: Mapping[str, str]) -> list[str]:
    """The reasons that name the nodes whose figures were left out (the first MAX_NAMED)."""
    named = sorted(untrusted.items())
    notes = [f"{node}'s router figures are invalid ({why}); left out"
             for node, why in named[:MAX_NAMED]]
    if len(named) > MAX_NAMED:
        notes.append(f"{len(named) - MAX_NAMED} more nodes' router figures are invalid; left out")
    return notes
