"""Which slot serves: ``serving_slot`` against its definition, for every slot set and weight."""

from __future__ import annotations

import itertools

import pytest

from coordinator.core.targets import idle_slot, serving_slot
from protocol.messages import SLOTS, DesiredState
from protocol.testing import NEW

WEIGHTS = (None, 0, 1, 50, 100)


def defined(desired: DesiredState) -> str | None:
    """The definition: the slot with the largest weight, ties to the first in SLOTS."""
    best, most = None, -1
    for slot in SLOTS:
        if slot in desired.slots and (weight := desired.weights.get(slot, 0)) > most:
            best, most = slot, weight
    return best


@pytest.mark.parametrize("slots", [(), ("a",), ("b",), ("a", "b")])
def test_the_serving_slot_is_the_heaviest_ties_to_a(slots: tuple[str, ...]) -> None:
    for wa, wb in itertools.product(WEIGHTS, WEIGHTS):
        weights = {s: w for s, w in (("a", wa), ("b", wb)) if w is not None}
        desired = DesiredState(fleet="f", node="n", service="hello", generation=1,
                               slots={s: NEW for s in slots}, weights=weights)
        assert serving_slot(desired) == defined(desired), (slots, weights)
        assert idle_slot(desired) == ("b" if defined(desired) == "a" else "a")
    assert serving_slot(None) is None
