"""Latency histogram arithmetic (protocol.histogram): quantiles and window deltas."""

from __future__ import annotations

import math

import pytest

from protocol import histogram as h
from protocol.messages import LATENCY_BOUNDS_MS

BOUNDS = (1.0, 2.0, 5.0, 10.0)


def test_bucket_boundaries() -> None:
    """A value equal to a bound falls in that bound's bucket; larger values overflow."""
    assert h.bucket_index(1.0, BOUNDS) == 0
    assert h.bucket_index(1.01, BOUNDS) == 1
    assert h.bucket_index(10.0, BOUNDS) == 3
    assert h.bucket_index(11.0, BOUNDS) == 4
    assert len(h.empty()) == len(LATENCY_BOUNDS_MS) + 1


@pytest.mark.parametrize(
    ("counts", "q", "want"),
    [
        ([100, 0, 0, 0, 0], 0.99, 1.0),
        ([99, 1, 0, 0, 0], 0.99, 1.0),
        ([98, 2, 0, 0, 0], 0.99, 2.0),
        ([50, 0, 49, 0, 1], 0.99, 5.0),
        ([50, 0, 48, 0, 2], 0.99, math.inf),
        ([0, 0, 0, 1, 0], 0.5, 10.0),
        ([1, 1, 1, 1, 0], 1.0, 10.0),
    ],
)
def test_quantile_is_the_upper_bound_of_its_bucket(
    counts: list[int], q: float, want: float
) -> None:
    """The q-quantile is read as the upper bound of the bucket holding rank ceil(q*n)."""
    assert h.quantile(counts, q, BOUNDS) == want


def test_quantile_of_nothing_and_bad_input() -> None:
    """An empty histogram has no quantile; a bad q or shape is refused."""
    assert h.quantile([0] * 5, 0.99, BOUNDS) is None
    with pytest.raises(ValueError, match="outside"):
        h.quantile([1, 0, 0, 0, 0], 0.0, BOUNDS)
    with pytest.raises(ValueError, match="buckets"):
        h.quantile([1, 0], 0.5, BOUNDS)


def test_delta_of_snapshots_and_reset() -> None:
    """Two snapshots of one epoch subtract; a reset (a count went down) yields the newer one."""
    assert h.delta([5, 3, 1], [2, 3, 0]) == [3, 0, 1]
    assert h.delta([5, 3, 1], None) == [5, 3, 1]
    assert h.delta([1, 0, 0], [2, 3, 0]) == [1, 0, 0]
    assert h.delta([1, 0, 0], [1, 0]) == [1, 0, 0]


def test_record_and_merge() -> None:
    """record counts in place; merge adds histograms of the same shape only."""
    c = h.empty(BOUNDS)
    for v in (0.5, 1.5, 7, 100):
        h.record(c, v, BOUNDS)
    assert c == [1, 1, 0, 1, 1] and h.total(c) == 4
    assert h.merge(c, c) == [2, 2, 0, 2, 2]
    assert h.merge([], c) == c
    with pytest.raises(ValueError, match="merge"):
        h.merge([1], [1, 2])
