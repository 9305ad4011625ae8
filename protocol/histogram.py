"""Latency histograms as the router reports them: pure arithmetic, no clock, no IO.

A histogram is a list of counts, one per bucket of ``bounds`` (upper bounds in milliseconds,
ascending) plus a last overflow bucket for everything slower, so ``len(counts) == len(bounds)+1``.
Routers report cumulative counts since their ``epoch``; the coordinator takes the difference of two
snapshots to get a window (``delta``) and reads a quantile from it (``quantile``).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence

from protocol.messages import LATENCY_BOUNDS_MS


def empty(bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> list[int]:
    """A histogram with every bucket at zero."""
    return [0] * (len(bounds) + 1)


def bucket_index(value_ms: float, bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> int:
    """The bucket that counts ``value_ms``: the first whose upper bound is >= it (else overflow)."""
    return bisect_left(bounds, value_ms)


def record(counts: list[int], value_ms: float, bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> None:
    """Count one observation in place."""
    counts[bisect_left(bounds, value_ms)] += 1


def total(counts: Sequence[int]) -> int:
    """How many observations the histogram holds."""
    return sum(counts)


def quantile(
    counts: Sequence[int], q: float, bounds: Sequence[float] = LATENCY_BOUNDS_MS
) -> float | None:
    """The ``q`` quantile (0 < q <= 1) in ms, as the upper bound of the bucket that holds it.

    Reporting the upper bound errs on the slow side, which is what a latency gate wants. None when
    the histogram is empty (no data is never a pass); ``inf`` when it falls in the overflow bucket.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile {q} is outside (0, 1]")
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"histogram has {len(counts)} buckets, expected {len(bounds) + 1}")
    n = sum(counts)
    if n == 0:
        return None
    # The rank of the q-quantile, 1-based: the smallest r with r >= q*n (the epsilon keeps
    # 0.99 * 100 from becoming 99.00000000000001 and so rank 100).
    rank = max(1, math.ceil(q * n - 1e-9))
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            return float(bounds[i]) if i < len(bounds) else float("inf")
    return float("inf")  # unreachable: seen ends at n >= rank


def is_count(value: object) -> bool:
    """Whether ``value`` can be a counter: a whole number, not negative (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def problem(
    counts: Sequence[object], observations: int, bounds: Sequence[float] = LATENCY_BOUNDS_MS
) -> str | None:
    """Why ``counts`` cannot be the histogram of ``observations`` over ``bounds``; None if it can.

    For figures a node reports about itself: every bucket a count, one per bound plus the
    overflow, adding up to the observations they claim to hold. Empty is the histogram of no
    observation at all.
    """
    if not counts and observations == 0:
        return None
    if len(counts) != len(bounds) + 1:
        return f"has {len(counts)} buckets, not {len(bounds) + 1}"
    for i, c in enumerate(counts):
        if not is_count(c):
            return f"bucket {i} is {c!r}, not a count"
    added = sum(counts)  # type: ignore[arg-type]  # every item is an int, checked above
    if added != observations:
        return f"buckets add up to {added}, not {observations}"
    return None


def delta(newer: Sequence[int], older: Sequence[int] | None) -> list[int]:
    """Counts observed between two cumulative snapshots of the same router epoch.

    ``older`` None or of another shape (a router restarted with other bounds) means "since the
    start". A bucket that went down means the counters were reset; then ``newer`` is the window.
    """
    if older is None or len(older) != len(newer):
        return list(newer)
    out = [n - o for n, o in zip(newer, older, strict=True)]
    if any(d < 0 for d in out):
        return list(newer)
    return out


def merge(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The sum of two histograms over the same bounds (e.g. one slot across nodes)."""
    if not a:
        return list(b)
    if not b:
        return list(a)
    if len(a) != len(b):
        raise ValueError(f"cannot merge histograms of {len(a)} and {len(b)} buckets")
    return [x + y for x, y in zip(a, b, strict=True)]
