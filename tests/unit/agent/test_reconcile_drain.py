"""The reconciler and a desired drain (``fleetwave drain``): it goes to the router with the
weights, the slots stay as they are, and the state converges only once the router has it."""

from __future__ import annotations

from dataclasses import replace

import msgspec

from agent.reconcile import Route, assess, reconcile
from protocol.messages import DrainSpec
from tests.unit.agent.test_reconcile import V1, WINFO, desired, healthy, serving_v1, view

DRAIN = DrainSpec(grace=15.0, since=1.0, by="alice")


def test_a_drain_is_one_route_with_the_same_weights_and_no_slot_action() -> None:
    """Serving v1 and told to drain: one Route, weights unchanged, drain set; nothing else."""
    d = msgspec.structs.replace(desired(2, {"a": V1}, {"a": 100}), drain=DRAIN)
    assert reconcile(d, serving_v1(), 1.0) == [Route({"a": 100, "b": 0}, None, DRAIN)]


def test_converged_only_once_the_router_has_the_drain_and_undrain_routes_again() -> None:
    """The drained state converges once applied; then a desired state without the drain asks
    for one Route without it."""
    d = msgspec.structs.replace(desired(2, {"a": V1}, {"a": 100}), drain=DRAIN)
    assert assess(d, serving_v1()).phase == "converging"
    drained = replace(serving_v1(), applied_drain=DRAIN)
    assert reconcile(d, drained, 2.0) == []
    assert assess(d, drained).phase == "converged"
    back = desired(3, {"a": V1}, {"a": 100})
    assert reconcile(back, drained, 3.0) == [Route({"a": 100, "b": 0}, None, None)]
    assert assess(back, replace(drained, applied_drain=None)).phase == "converged"


def test_a_worker_has_no_router_to_drain() -> None:
    """A worker (no port) told to drain: nothing to route; it is converged as it is."""
    d = msgspec.structs.replace(desired(2, {"a": V1}, {}), drain=DRAIN)
    local = view(healthy("a", V1), releases=WINFO)
    assert reconcile(d, local, 1.0) == []
    assert assess(d, local).phase == "converged"
