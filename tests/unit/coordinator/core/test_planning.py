"""Planning: node selection, amount parsing, rolling and canary waves (tables, properties)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.amounts import batch_size, max_unavailable, parse_amount
from coordinator.core.planning import hold_out, natural_key, select
from coordinator.errors import UsageError
from coordinator.strategies import plan
from coordinator.strategies.canary import parse_weights, step_counts
from protocol.messages import NodeView, RolloutSpec


def fleet(n: int, **labels: str) -> list[NodeView]:
    return [NodeView(id=f"node-{i}", labels=dict(labels)) for i in range(1, n + 1)]


def spec(**kw: object) -> RolloutSpec:
    return RolloutSpec(service="hello", version="2.0.0", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "text", "total", "expected"),
    [
        ("count", "3", 10, 3),
        ("percent rounds up", "10%", 5, 1),
        ("exact percent", "10%", 30, 3),
        ("hundred percent", "100%", 7, 7),
        ("fraction percent", "12.5%", 8, 1),
    ],
)
def test_batch_size_table(name: str, text: str, total: int, expected: int) -> None:
    """--batch resolves counts as is and percentages rounded up."""
    assert batch_size(text, total) == expected, name


@pytest.mark.parametrize(
    ("name", "text", "total", "expected"),
    [
        ("count", "2", 10, 2),
        ("percent rounds down", "25%", 10, 2),
        ("never below one", "1%", 10, 1),
        ("all", "100%", 4, 4),
    ],
)
def test_max_unavailable_table(name: str, text: str, total: int, expected: int) -> None:
    """--max-unavailable percentages round down but never below one node."""
    assert max_unavailable(text, total) == expected, name


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0", "never move a node"),
        ("0%", "out of range"),
        ("101%", "out of range"),
        ("-1", "not a count"),
        ("abc", "not a count"),
        ("1.5", "whole number"),
        ("", "not a count"),
        ("5 %", "not a count"),
        ("9" * 400, "far too large"),  # infinity as a float (was an OverflowError)
        ("\u0661", "not a count"),  # an Arabic-Indic one: "\d" took it
    ],
)
def test_bad_amounts_say_why(text: str, why: str) -> None:
    """Malformed or out-of-range amounts are usage errors that name the flag and the reason."""
    with pytest.raises(UsageError, match=why) as info:
        parse_amount(text, flag="--batch")
    assert "--batch" in str(info.value)


def test_select_matches_every_label_and_sorts_naturally() -> None:
    """Selection keeps nodes carrying every selector pair, ordered node-2 before node-10."""
    nodes = [
        NodeView(id="node-10", labels={"zone": "a", "role": "web"}),
        NodeView(id="node-2", labels={"zone": "a", "role": "web"}),
        NodeView(id="node-3", labels={"zone": "b", "role": "web"}),
        NodeView(id="node-1", labels={"zone": "a"}),
    ]
    assert select(nodes, {"zone": "a", "role": "web"}) == ["node-2", "node-10"]
    assert select(nodes, {}) == ["node-1", "node-2", "node-3", "node-10"]
    assert natural_key("node-2") < natural_key("node-10")


def _split_key(node_id: str) -> tuple[tuple[int, int | str], ...]:
    """The natural key as first written: every digit run a number, every other run a name."""
    return tuple((0, int(part)) if i % 2 else (1, part)
                 for i, part in enumerate(re.split(r"(\d+)", node_id)) if part)


@given(st.text(alphabet="ab-_.0123456789", max_size=12))
def test_the_natural_key_of_any_id_is_the_split_one(node_id: str) -> None:
    """The short way for "name-12" ids gives the key the general split gives, for any id."""
    assert natural_key(node_id) == _split_key(node_id)


def test_no_matching_node_is_a_usage_error() -> None:
    """A selector that matches nothing is refused with the selector named."""
    with pytest.raises(UsageError, match="zone=z"):
        plan(fleet(3, zone="a"), spec(selector={"zone": "z"}))


@pytest.mark.parametrize(
    ("name", "n", "batch", "max_unav", "sizes"),
    [
        ("one by one", 3, "1", "1", [1, 1, 1]),
        ("batch capped by max-unavailable", 10, "5", "2", [2, 2, 2, 2, 2]),
        ("uneven last wave", 7, "3", "3", [3, 3, 1]),
        ("percent batch", 20, "25%", "100%", [5, 5, 5, 5]),
        ("all at once", 4, "100%", "100%", [4]),
    ],
)
def test_rolling_waves_table(
    name: str, n: int, batch: str, max_unav: str, sizes: list[int]
) -> None:
    """Rolling cuts the ordered nodes into chunks of min(batch, max-unavailable)."""
    waves = plan(fleet(n), spec(batch=batch, max_unavailable=max_unav))
    assert [len(w.nodes) for w in waves] == sizes, name
    assert [w.index for w in waves] == list(range(len(sizes)))
    assert all(w.weight == 100 for w in waves)


@pytest.mark.parametrize(
    ("name", "steps", "total", "counts"),
    [
        ("classic", ["1", "10%", "50%", "100%"], 20, [1, 2, 10, 20]),
        ("duplicates after rounding merge", ["1", "5%", "100%"], 10, [1, 10]),
        ("counts", ["2", "5"], 5, [2, 5]),
        ("single step", ["100%"], 3, [3]),
    ],
)
def test_canary_step_counts_table(
    name: str, steps: list[str], total: int, counts: list[int]
) -> None:
    """Steps resolve to cumulative node counts, percentages rounded up."""
    assert step_counts(steps, total) == counts, name


@pytest.mark.parametrize(
    ("name", "steps", "why"),
    [
        ("zero", ["0", "100%"], "never move a node"),
        ("over a hundred", ["1", "101%"], "out of range"),
        ("descending", ["50%", "10%", "100%"], "strictly increase"),
        ("repeated", ["10%", "10%", "100%"], "strictly increase"),
        ("not ending at all", ["1", "50%"], "must end at 100%"),
        ("count above fleet", ["1", "50"], "more than the 20 selected"),
        ("not a number", ["one", "100%"], "not a count"),
    ],
)
def test_bad_canary_steps_say_why(name: str, steps: list[str], why: str) -> None:
    """Bad --steps are usage errors that say why."""
    with pytest.raises(UsageError, match=why):
        plan(fleet(20), spec(strategy="canary", steps=steps))


@pytest.mark.parametrize(
    ("weights", "why"),
    [([-1, 100], "out of range"), ([5, 101], "out of range"), ([25, 5, 100], "strictly increase"),
     ([5, 25], "must end at 100")],
)
def test_bad_canary_weights_say_why(weights: list[int], why: str) -> None:
    """Bad --weights are usage errors that say why."""
    with pytest.raises(UsageError, match=why):
        parse_weights(weights)


def test_canary_steps_become_waves_of_the_difference() -> None:
    """Each canary step moves the nodes between the previous count and its own."""
    waves = plan(fleet(20), spec(strategy="canary", steps=["1", "10%", "50%", "100%"],
                                max_unavailable="100%"))
    assert [len(w.nodes) for w in waves] == [1, 1, 8, 10]
    assert waves[0].nodes == ("node-1",)


def test_canary_weights_alone_shift_every_node() -> None:
    """With weights only, every node goes through each weight in turn."""
    waves = plan(fleet(3), spec(strategy="canary", weights=[5, 25, 100]))
    assert [(w.weight, len(w.nodes)) for w in waves] == [(5, 3), (25, 3), (100, 3)]


def test_canary_weights_and_steps_weigh_the_first_step() -> None:
    """With both, the first step's nodes go through every weight, then the steps continue."""
    waves = plan(fleet(10), spec(strategy="canary", steps=["2", "100%"], weights=[10, 100]))
    assert [(w.weight, w.nodes) for w in waves][:2] == [(10, ("node-1", "node-2")),
                                                        (100, ("node-1", "node-2"))]
    assert len(waves[2].nodes) == 8


def test_unsupported_strategy_is_a_usage_error() -> None:
    """A strategy this coordinator cannot run is refused before anything moves."""
    with pytest.raises(UsageError, match="not supported"):
        plan(fleet(2), spec(strategy="bogus"))


amounts = st.one_of(
    st.integers(1, 60).map(str), st.integers(1, 100).map(lambda p: f"{p}%"),
)


@given(n=st.integers(1, 60), batch=amounts, max_unav=amounts)
def test_rolling_properties(n: int, batch: str, max_unav: str) -> None:
    """Every selected node lands in exactly one wave; no wave exceeds max-unavailable."""
    waves = plan(fleet(n), spec(batch=batch, max_unavailable=max_unav))
    placed = [node for w in waves for node in w.nodes]
    assert sorted(placed) == sorted(f"node-{i}" for i in range(1, n + 1))
    assert len(placed) == len(set(placed))
    bound = max_unavailable(max_unav, n)
    assert all(0 < len(w.nodes) <= bound for w in waves)


@given(n=st.integers(1, 60), cuts=st.lists(st.integers(1, 100), min_size=0, max_size=5))
def test_canary_properties(n: int, cuts: list[int]) -> None:
    """Canary steps place every node exactly once, in order, ending with all of them."""
    steps = [f"{p}%" for p in sorted(set(cuts)) if p < 100] + ["100%"]
    waves = plan(fleet(n), spec(strategy="canary", steps=steps))
    placed = [node for w in waves for node in w.nodes]
    assert placed == [f"node-{i}" for i in range(1, n + 1)]


# -- cordoned nodes (``fleetwave cordon``) --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "selected", "cordoned", "targets", "skipped"),
    [
        ("none cordoned", ["node-1", "node-2"], set(), ["node-1", "node-2"], []),
        ("one cordoned", ["node-1", "node-2", "node-3"], {"node-2"}, ["node-1", "node-3"],
         ["node-2"]),
        ("all cordoned", ["node-1", "node-2"], {"node-1", "node-2"}, [], ["node-1", "node-2"]),
        ("cordoned but not selected", ["node-1"], {"node-9"}, ["node-1"], []),
    ],
)
def test_hold_out_table(name: str, selected: list[str], cordoned: set[str], targets: list[str],
                        skipped: list[str]) -> None:
    """hold_out splits the selected nodes, in their order, into targets and cordoned skips."""
    assert hold_out(selected, cordoned) == (targets, skipped), name


def test_plan_leaves_cordoned_nodes_out_of_every_wave() -> None:
    """A cordoned node is in no wave, whatever the strategy; the others are planned as usual."""
    for strategy in ("rolling", "canary", "blue-green"):
        waves = plan(fleet(4), spec(strategy=strategy, batch="1"), cordoned={"node-2"})
        planned = {n for w in waves for n in w.nodes}
        assert planned == {"node-1", "node-3", "node-4"}, strategy


def test_plan_refuses_when_every_selected_node_is_cordoned() -> None:
    """Every node the selector matches is cordoned: a usage error naming them and the way out."""
    with pytest.raises(UsageError, match=r"every node matching selector zone=a is cordoned "
                       r"\(node-1, node-2\); return one with 'fleetwave uncordon NODE'"):
        plan(fleet(2, zone="a"), spec(selector={"zone": "a"}), cordoned={"node-1", "node-2"})
