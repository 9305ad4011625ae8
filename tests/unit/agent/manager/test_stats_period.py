"""How often the agent reads its routers' counters: fast only while a router's traffic is judged."""

from __future__ import annotations

from agent.manager.routing import stats_period
from agent.manager.service import (
    STATS_EVERY,
    STATS_EVERY_MIN,
    STATS_EVERY_SPLIT,
    STATS_FAST_AFTER_SWITCH,
    Service,
)
from protocol.messages import DesiredState, MirrorSpec


def svc(weights: dict[str, int], mirror: MirrorSpec | None = None,
        asked: float = 0.0) -> Service:
    s = Service(name="hello")
    s.applied_weights, s.applied_mirror = weights, mirror
    s.desired = DesiredState(fleet="f", node="n", service="hello", generation=1,
                             stats_every=asked)
    return s


def test_one_slot_or_none_reads_at_the_usual_period() -> None:
    assert stats_period([]) == STATS_EVERY
    assert stats_period([svc({}), svc({"blue": 100})]) == STATS_EVERY
    assert stats_period([svc({"blue": 100, "green": 0})]) == STATS_EVERY  # a switched blue-green


def test_a_split_or_a_mirror_anywhere_reads_fast() -> None:
    assert stats_period([svc({"blue": 100}), svc({"blue": 95, "green": 5})]) == STATS_EVERY_SPLIT
    shadow = MirrorSpec(slot="green", percent=50.0)
    assert stats_period([svc({"blue": 100}, shadow)]) == STATS_EVERY_SPLIT


def test_a_judged_switch_reads_as_asked_for_a_while_though_nothing_splits() -> None:
    """A canary at weight 100 or a blue-green switch under sequential analysis splits nothing,
    but its first seconds are what the gate judges first: read as the desired state asks."""
    switched = svc({"green": 100}, asked=0.25)
    switched.weights_changed = 1000.0
    assert stats_period([switched], 1000.0) == 0.25
    assert stats_period([switched], 1000.0 + STATS_FAST_AFTER_SWITCH - 0.1) == 0.25
    assert stats_period([switched], 1000.0 + STATS_FAST_AFTER_SWITCH) == STATS_EVERY
    assert stats_period([svc({"green": 100}, asked=0.25)], 1000.0) == STATS_EVERY  # no switch


def test_a_switch_nobody_judges_sequentially_costs_no_extra_reads() -> None:
    """Threshold gates judge the whole bake at its end: a switch alone keeps the usual period."""
    switched = svc({"green": 100})
    switched.weights_changed = 1000.0
    assert stats_period([switched], 1000.0) == STATS_EVERY


def test_a_judged_split_reads_as_asked_and_never_faster_than_the_floor() -> None:
    assert stats_period([svc({"blue": 50, "green": 50}, asked=0.25)]) == 0.25
    assert stats_period([svc({"blue": 50, "green": 50}, asked=0.001)]) == STATS_EVERY_MIN
    assert stats_period([svc({"blue": 50, "green": 50}, asked=0.25),
                         svc({"blue": 100})]) == 0.25


def test_the_fast_period_keeps_the_agents_ticks() -> None:
    # The reads stay on the heartbeat's ticks (agent.cadence): the fast period divides the usual.
    assert STATS_EVERY_SPLIT < STATS_EVERY
    assert (STATS_EVERY / STATS_EVERY_SPLIT).is_integer()


def test_a_threshold_waves_ask_for_the_usual_period_slows_no_split() -> None:
    """A wave a threshold gate judges asks for the usual period (2 s, to be reported at every
    read in a large fleet): a canary's split under it is still read every STATS_EVERY_SPLIT."""
    assert stats_period([svc({"blue": 90, "green": 10}, asked=STATS_EVERY)]) == STATS_EVERY_SPLIT
    assert stats_period([svc({"green": 100}, asked=STATS_EVERY)]) == STATS_EVERY
