"""Durations as people write them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.durations import format_duration, parse_duration
from protocol.errors import ProtocolError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1m30s", 90.0),
     ("0", 0.0), ("1.5s", 1.5), (" 10s ", 10.0), ("0s", 0.0)],
)
def test_parses(text: str, seconds: float) -> None:
    """Each written form means the number of seconds a person expects."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5x", "1 s", "-1s", "1s2", "ms", "1e3s", "9999h"])
def test_refuses(text: str) -> None:
    """Bare numbers, unknown units and garbage are refused with the fix in the message."""
    with pytest.raises(ProtocolError):
        parse_duration(text, what="bake")


@given(st.integers(min_value=0, max_value=10**6))
def test_format_round_trips_whole_seconds(n: int) -> None:
    """What format_duration writes, parse_duration reads back (to the second)."""
    assert parse_duration(format_duration(float(n))) == pytest.approx(n, abs=1)
