"""``core.staging``: the --prestage text, the waves ahead, the window, and the refusals."""

from __future__ import annotations

import pytest

from coordinator import strategies
from coordinator.core import staging
from coordinator.errors import UsageError
from protocol.testing import spec


@pytest.mark.parametrize(("text", "default", "ahead"), [
    ("", 1, 1), ("", 0, 0), ("0", 1, 0), ("3", 1, 3), (" 2 ", 0, 2), ("all", 0, staging.ALL_WAVES),
])
def test_waves_ahead(text: str, default: int, ahead: int) -> None:
    """"" is the strategy's default, a number is itself, all is every later wave."""
    staging.check(text)
    assert staging.waves_ahead(text, default) == ahead


@pytest.mark.parametrize(("current", "ahead", "total", "window"), [
    (0, 1, 5, [1]), (0, 2, 5, [1, 2]), (3, 2, 5, [4]), (4, 1, 5, []), (0, 0, 5, []),
    (1, staging.ALL_WAVES, 5, [2, 3, 4]),
])
def test_window(current: int, ahead: int, total: int, window: list[int]) -> None:
    """The waves staged while wave ``current`` runs: the next ``ahead``, never past the end."""
    assert list(staging.window(current, ahead, total)) == window


@pytest.mark.parametrize(("text", "says"), [
    ("-1", "is negative"), ("x", "is not a number of waves"), ("1.5", "is not a number"),
    ("ALL ", "is not a number"),
])
def test_bad_prestage_is_refused_in_one_line(text: str, says: str) -> None:
    """A negative or non-numeric value: one line saying what to write instead."""
    with pytest.raises(UsageError, match=says) as info:
        strategies.validate(spec(prestage=text))
    assert "\n" not in str(info.value) and "--prestage" in str(info.value)


@pytest.mark.parametrize("kw", [
    {"strategy": "blue-green"}, {"strategy": "shadow", "mirror": 10.0},
    {"strategy": "remove", "version": ""},
])
def test_prestage_where_it_has_no_meaning_is_refused(kw: dict[str, object]) -> None:
    """Blue-green, shadow and remove stage (or start) nothing ahead: --prestage is refused."""
    strategies.validate(spec(**kw))  # without it: fine
    with pytest.raises(UsageError, match="has no meaning with --strategy"):
        strategies.validate(spec(prestage="1", **kw))


@pytest.mark.parametrize(("strategy", "text", "ahead"), [
    ("rolling", "", 1), ("rolling", "0", 0), ("rolling", "all", staging.ALL_WAVES),
    ("canary", "", 0), ("canary", "2", 2), ("blue-green", "", 0), ("shadow", "", 0),
])
def test_each_strategy_says_how_far_ahead_it_stages(strategy: str, text: str, ahead: int) -> None:
    """Rolling stages one wave ahead by default, canary none, the staging strategies none."""
    assert strategies.waves_ahead(spec(strategy=strategy, prestage=text)) == ahead
