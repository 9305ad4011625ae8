"""What a peer states as a number is bounded where it is decoded (protocol.messages): a node's
credentials let it write any value into its own reports, and a review's node crashed the
leader's runner, every resync of its rollout, one leadership a second, with generation 10**4300
(an f-string past Python's 4,300 digits) and router counters of 10**400 (OverflowError)."""

from __future__ import annotations

import json

import pytest

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import Heartbeat, ObservedState, RouterStats, SlotTraffic

HUGE = "9" * 4300


def observed(**fields: object) -> bytes:
    return json.dumps({"node": "n1", "service": "web", **fields}).encode()


@pytest.mark.parametrize("body", [
    observed(generation=int(HUGE)),
    observed(observed_generation=-1),
    observed(weights={"a": 10**400}),
    observed(router={"slots": {"a": {"requests": 10**400}}}),
    observed(router={"slots": {"a": {"latency": [1, 10**20]}}}),
    observed(router={"slots": {"a": {"codes": {"5xx": -3}}}}),
    observed(router={"slots": {"a": {"latency_sum_ms": 1e300}}}),
    observed(router={"mirror": {"compared": 2**60}}),
    observed(router={"cohort": {"users": {"a": [2**64]}}}),
    observed(router={"pid": -1}),
    observed(slots={"a": {"slot": "a", "port": 70000}}),
])
def test_a_report_with_a_number_out_of_bounds_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="ObservedState"):
        decode(ObservedState, body)


def test_the_largest_figures_a_real_node_reports_are_taken() -> None:
    """Bounds far above any real figure: 2**53 requests, int64 generations, 64-bit hashes."""
    state = ObservedState(
        node="n1", service="web", generation=2**63 - 1, observed_generation=2**63 - 1,
        router=RouterStats(slots={"a": SlotTraffic(requests=2**53, latency=[2**53],
                                                   latency_sum_ms=1e15)}))
    assert decode(ObservedState, encode(state)) == state
    assert decode(ObservedState, observed(router={"cohort": {"users": {"a": [2**64 - 1]}}}))


def test_a_heartbeat_with_a_huge_figure_is_refused() -> None:
    with pytest.raises(ProtocolError, match="Heartbeat"):
        decode(Heartbeat, json.dumps({"node": "n1", "agent_rss": 10**30}).encode())
