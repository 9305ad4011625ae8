"""The reconciler and a desired cohort rule: it goes to the router with the weights, and the
state converges only once the router has it."""

from __future__ import annotations

from dataclasses import replace

import msgspec

from agent.reconcile import Route, assess, reconcile
from protocol.messages import CohortSpec
from tests.unit.agent.test_reconcile import V1, desired, serving_v1

COHORT = CohortSpec(key="header:X-User", salt="r-1", new="b", allow=["header:X-Beta=1"])


def test_a_cohort_rule_is_one_route_and_converges_once_applied() -> None:
    """Serving v1 and given a cohort rule: one Route with it; converged once the router has it;
    dropping the rule routes again without it."""
    d = msgspec.structs.replace(desired(2, {"a": V1}, {"a": 100}), cohort=COHORT)
    assert reconcile(d, serving_v1(), 1.0) == [Route({"a": 100, "b": 0}, None, None, COHORT)]
    assert assess(d, serving_v1()).phase == "converging"
    applied = replace(serving_v1(), applied_cohort=COHORT)
    assert reconcile(d, applied, 2.0) == []
    assert assess(d, applied).phase == "converged"
    back = desired(3, {"a": V1}, {"a": 100})
    assert reconcile(back, applied, 3.0) == [Route({"a": 100, "b": 0}, None, None, None)]


def test_unset_cohort_keeps_the_bytes() -> None:
    """A desired state without a cohort encodes without the field (older states keep bytes)."""
    assert b"cohort" not in msgspec.json.encode(desired(2, {"a": V1}, {"a": 100}))
