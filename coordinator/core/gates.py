"""Gates: the health and traffic checks that decide whether a wave may be followed by the next.

Theory of operation: the engine takes a snapshot of every target node's RouterStats when a wave's
bake starts and another when it ends. Router counters are cumulative since the router started
(``RouterStats.epoch``), so the traffic *in the window* is the difference of the two snapshots; if
the epoch changed, the router restarted inside the window and its counters start from zero, so the
window is the end snapshot alone (the traffic since the restart: a shorter window, never a
negative one). ``window`` does this per slot; ``figures`` sums the windows of the new slots of the
wave and of the old slots of every target node; ``evaluate`` applies the thresholds.

Verdicts: ``pass``, ``fail`` (a threshold was crossed: the reasons say which, with the figures) or
``inconclusive`` (too little data to judge). No data is never a pass: a traffic gate with zero
requests in the window is inconclusive even without ``--min-requests``. A failed check outweighs
an inconclusive one, so the verdict is ``fail`` if any check fails.

Trust: a node's figures feed the gates only if ``core.evidence`` admits them; the nodes left out
make a verdict that would pass inconclusive, never a pass (``judged``).

Quantiles come from the router's latency histogram (bounds ``LATENCY_BOUNDS_MS``, plus a last
overflow bucket): the q-quantile is the upper bound of the bucket that holds the ceil(q * count)-th
fastest request, so it errs on the slow side by at most one bucket (~25%). ``quantile`` here is
``protocol.histogram.quantile`` read tolerantly (a histogram of another length is fitted to our
bounds; ``distrust`` keeps such reports out, but a sum kept in a rollout record is read the same
way), and the overflow bucket is reported as a finite figure so that gate figures stay valid JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from coordinator.core.evidence import left_out, listed
from protocol.histogram import quantile as histogram_quantile
from protocol.messages import LATENCY_BOUNDS_MS, Gates, MirrorTraffic, RouterStats

# What the overflow bucket reports as its bound: one log step above the last finite bound.
OVERFLOW_MS = round(LATENCY_BOUNDS_MS[-1] * 1.25, 3)

Outcome = Literal["pass", "fail", "inconclusive"]

# The fewest old-release requests a p99 to compare with is read from (or ``--min-requests``, if
# more): the old slots of a last wave are at weight 0, and the few requests they still answer
# were in flight at the switch, the slowest by selection; their p99 would pass any regression.
MIN_OLD_REQUESTS = 100


def old_floor(gates: Gates) -> int:
    """How many old-release requests a p99 comparison needs (``MIN_OLD_REQUESTS``)."""
    return max(gates.min_requests or 0, MIN_OLD_REQUESTS)


@dataclass(frozen=True)
class Window:
    """Traffic of one slot (or a sum of slots) inside the bake window."""

    requests: int = 0
    errors: int = 0
    latency: tuple[int, ...] = ()

    def __add__(self, other: Window) -> Window:
        return Window(
            self.requests + other.requests, self.errors + other.errors,
            add_histograms(self.latency, other.latency),
        )


def add_histograms(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """Bucket-wise sum; a shorter histogram (an older router) counts as zeros."""
    n = max(len(a), len(b))
    return tuple((a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n))


def sub_histograms(end: Sequence[int], start: Sequence[int]) -> tuple[int, ...]:
    """Bucket-wise ``end - start``, clamped at zero."""
    n = max(len(end), len(start))
    return tuple(
        max(0, (end[i] if i < len(end) else 0) - (start[i] if i < len(start) else 0))
        for i in range(n)
    )


def quantile(histogram: Sequence[int], q: float) -> float | None:
    """The q-quantile in ms of a latency histogram, or None if it is empty.

    ``protocol.histogram.quantile``, made tolerant of what an agent of another version may send:
    a histogram of another length is read against our bounds (missing buckets count as zero,
    extra ones as overflow), and the overflow bucket reports OVERFLOW_MS rather than infinity, so
    that gate figures stay finite JSON.
    """
    n = len(LATENCY_BOUNDS_MS)
    counts = [*histogram[:n], *([0] * (n - len(histogram))), sum(histogram[n:])]
    value = histogram_quantile(counts, q)
    return OVERFLOW_MS if value == math.inf else value


NO_TRAFFIC = Window()


def window(start: RouterStats | None, end: RouterStats | None, slot: str) -> Window:
    """The traffic of ``slot`` between two snapshots of one router (see the module docstring)."""
    if end is None or (after := end.slots.get(slot)) is None:
        return NO_TRAFFIC
    before = None
    if start is not None and start.epoch == end.epoch:
        before = start.slots.get(slot)
    if before is None:
        return Window(after.requests, after.errors, tuple(after.latency))
    if after.requests < before.requests or after.errors < before.errors:
        # Counters went backwards: ``distrust`` keeps such a report from the gates; here only
        # so that a window is never negative.
        return Window(after.requests, after.errors, tuple(after.latency))
    if (after.requests, after.errors, after.latency) == (
            before.requests, before.errors, before.latency):
        return NO_TRAFFIC  # the usual case on most nodes of a big fleet: nothing new
    return Window(
        after.requests - before.requests, after.errors - before.errors,
        sub_histograms(after.latency, before.latency),
    )


def total(windows: Iterable[Window]) -> Window:
    """The sum of ``windows``, in one pass (``sum`` would build a Window per term)."""
    requests = errors = 0
    latency: list[int] = []
    for w in windows:
        if w is NO_TRAFFIC:
            continue
        requests += w.requests
        errors += w.errors
        if len(w.latency) > len(latency):
            latency.extend([0] * (len(w.latency) - len(latency)))
        for i, count in enumerate(w.latency):
            latency[i] += count
    return Window(requests, errors, tuple(latency))


def mirror_window(start: RouterStats | None, end: RouterStats | None) -> tuple[int, int]:
    """(compared, mismatched) shadow comparisons between two snapshots of one router."""
    if end is None or end.mirror is None:
        return 0, 0
    after = end.mirror
    before = MirrorTraffic()
    if start is not None and start.epoch == end.epoch and start.mirror is not None:
        before = start.mirror
    if after.compared < before.compared or after.mismatched < before.mismatched:
        before = MirrorTraffic()
    return after.compared - before.compared, after.mismatched - before.mismatched


@dataclass(frozen=True)
class Figures:
    """Everything the gates look at for one wave."""

    nodes: int
    healthy: int
    new: Window
    old: Window
    compared: int = 0
    mismatched: int = 0
    untrusted: Mapping[str, str] = field(default_factory=dict)  # node -> why, left out

    @property
    def healthy_fraction(self) -> float:
        return self.healthy / self.nodes if self.nodes else 0.0

    @property
    def error_rate(self) -> float | None:
        return self.new.errors / self.new.requests if self.new.requests else None

    @property
    def old_error_rate(self) -> float | None:
        """The old slots' share of errors over the same window: only shown beside the new
        one's (the dashboard's chart per version), never judged."""
        return self.old.errors / self.old.requests if self.old.requests else None

    @property
    def p99_new(self) -> float | None:
        return quantile(self.new.latency, 0.99)

    @property
    def p99_old(self) -> float | None:
        return quantile(self.old.latency, 0.99)

    @property
    def p99_ratio(self) -> float | None:
        new, old = self.p99_new, self.p99_old
        return new / old if new is not None and old else None

    @property
    def mismatch_rate(self) -> float | None:
        return self.mismatched / self.compared if self.compared else None

    def as_dict(self) -> dict[str, Any]:
        """Plain figures for events and the rollout record (JSON-safe: no infinities)."""
        return {
            "nodes": self.nodes, "healthy": self.healthy,
            "healthy_fraction": round(self.healthy_fraction, 4),
            "requests": self.new.requests, "errors": self.new.errors,
            "error_rate": rounded(self.error_rate),
            "p99_new_ms": self.p99_new, "p99_old_ms": self.p99_old,
            "old_requests": self.old.requests, "old_errors": self.old.errors,
            "old_error_rate": rounded(self.old_error_rate), "p99_ratio": rounded(self.p99_ratio),
            "compared": self.compared, "mismatched": self.mismatched,
            "mismatch_rate": rounded(self.mismatch_rate), "untrusted": listed(self.untrusted),
            "untrusted_nodes": len(self.untrusted),
        }


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def figures(
    nodes: int, healthy: int, new: Iterable[Window], old: Iterable[Window],
    mirror: Iterable[tuple[int, int]] = (), untrusted: Mapping[str, str] | None = None,
) -> Figures:
    """Sum per-slot windows into the figures of one wave (``untrusted``: the nodes left out)."""
    total_new = total(new)
    total_old = total(old)
    compared = mismatched = 0
    for c, m in mirror:
        compared += c
        mismatched += m
    return Figures(nodes, healthy, total_new, total_old, compared, mismatched,
                   dict(untrusted or {}))


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reasons: tuple[str, ...]
    figures: dict[str, Any]

    @property
    def reason(self) -> str:
        """All reasons in one line."""
        return "; ".join(self.reasons)


def judged(fails: list[str], unsure: list[str], reads_traffic: bool,
            untrusted: Mapping[str, str], data: dict[str, Any]) -> Verdict:
    """Fail beats inconclusive beats pass; figures left out of a traffic gate are never a pass."""
    notes = left_out(untrusted) if reads_traffic else []
    if fails:
        return Verdict("fail", tuple(fails + notes), data)
    if unsure or notes:
        return Verdict("inconclusive", tuple(unsure + notes), data)
    return Verdict("pass", (), data)


def evaluate(gates: Gates, fig: Figures) -> Verdict:
    """Apply every configured gate to ``fig``: fail beats inconclusive beats pass."""
    fails: list[str] = []
    unsure: list[str] = []
    health_check(gates, fig, fails)
    if enough_traffic(gates, fig, unsure):
        threshold_checks(gates, fig, fails, unsure)
    mismatch_check(gates, fig, fails, unsure)
    data = fig.as_dict() | {"thresholds": thresholds(gates)}
    return judged(fails, unsure, reads_traffic(gates), fig.untrusted, data)


def health_check(gates: Gates, fig: Figures, fails: list[str]) -> None:
    if gates.min_healthy is not None and fig.healthy_fraction < gates.min_healthy:
        fails.append(
            f"healthy {fig.healthy}/{fig.nodes} ({fig.healthy_fraction:.0%}) is below "
            f"min-healthy {gates.min_healthy:.0%}"
        )


def enough_traffic(gates: Gates, fig: Figures, unsure: list[str]) -> bool:
    """Whether the new slots saw enough requests for the traffic gates to judge (else why not)."""
    traffic_gates = gates.max_error_rate is not None or gates.max_p99_ratio is not None
    if gates.min_requests is not None and fig.new.requests < gates.min_requests:
        unsure.append(
            f"{fig.new.requests} requests reached the new release, fewer than min-requests "
            f"{gates.min_requests}"
        )
        return False
    if traffic_gates and fig.new.requests == 0:
        unsure.append("no request reached the new release during the bake, so traffic gates "
                      "cannot pass")
        return False
    return True


def threshold_checks(gates: Gates, fig: Figures, fails: list[str], unsure: list[str]) -> None:
    """``--analysis threshold``: the window's error rate and p99 ratio against the limits."""
    if gates.max_error_rate is not None:
        rate = fig.error_rate or 0.0
        if rate > gates.max_error_rate:
            fails.append(
                f"error rate {rate:.2%} ({fig.new.errors}/{fig.new.requests}) is above "
                f"max-error-rate {gates.max_error_rate:.2%}"
            )
    if gates.max_p99_ratio is not None:
        ratio = fig.p99_ratio
        if ratio is None:
            unsure.append("no old-release traffic in the window to compare p99 latency with")
        elif ratio > gates.max_p99_ratio:
            fails.append(
                f"p99 {fig.p99_new}ms vs {fig.p99_old}ms (x{ratio:.2f}) is above "
                f"max-p99-ratio x{gates.max_p99_ratio:g}"
            )
        elif fig.old.requests < (floor := old_floor(gates)):
            unsure.append(
                f"p99 of the old release read from {fig.old.requests} requests, fewer than "
                f"{floor}: too few to pass the p99 gate on"
            )


def mismatch_check(gates: Gates, fig: Figures, fails: list[str], unsure: list[str]) -> None:
    if gates.max_mismatch_rate is not None:
        if gates.min_requests is not None and fig.compared < gates.min_requests:
            unsure.append(
                f"{fig.compared} mirrored requests compared, fewer than min-requests "
                f"{gates.min_requests}"
            )
        elif fig.mismatch_rate is None:
            unsure.append("no mirrored request was compared, so the mismatch gate cannot pass")
        elif fig.mismatch_rate > gates.max_mismatch_rate:
            fails.append(
                f"mismatch rate {fig.mismatch_rate:.2%} ({fig.mismatched}/{fig.compared}) is "
                f"above max-mismatch-rate {gates.max_mismatch_rate:.2%}"
            )


def reads_traffic(gates: Gates) -> bool:
    """Whether any gate set reads router figures (--min-healthy reads the slots' health)."""
    return any(x is not None for x in (gates.max_error_rate, gates.max_p99_ratio,
                                       gates.max_mismatch_rate, gates.min_requests))


def thresholds(gates: Gates) -> dict[str, Any]:
    """The limits for the record and events (the analysis only when it is not the default)."""
    out: dict[str, Any] = {
        "min_healthy": gates.min_healthy, "max_error_rate": gates.max_error_rate,
        "max_p99_ratio": gates.max_p99_ratio, "max_mismatch_rate": gates.max_mismatch_rate,
        "min_requests": gates.min_requests,
    }
    if gates.analysis != "threshold":
        out |= {"analysis": gates.analysis, "alpha": gates.alpha}
    return out
