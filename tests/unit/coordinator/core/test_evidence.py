"""Evidence: a node's own router figures are checked before they feed a gate."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.core.evidence import distrust
from protocol.messages import MirrorTraffic, RouterStats, SlotTraffic
from tests.unit.coordinator.kit import NB, hist


def lying(**slot: object) -> RouterStats:
    """Router stats with one slot ``b`` built from raw fields, however impossible."""
    fields: dict[str, object] = {"requests": 10, "errors": 0, "latency": hist(b3=10)} | slot
    return RouterStats(epoch=1.0, slots={"b": SlotTraffic(**fields)})  # type: ignore[arg-type]


def mirrored(**fields: object) -> RouterStats:
    """Router stats with mirror counters built from raw fields, however impossible."""
    base: dict[str, object] = {"mirrored": 10, "compared": 10, "mismatched": 1,
                               "shadow_latency": hist(b3=10), "live_latency": hist(b2=10)}
    return RouterStats(epoch=1.0, mirror=MirrorTraffic(**(base | fields)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("start", "end", "says"),
    [
        pytest.param(None, lying(), None, id="consistent"),
        pytest.param(None, lying(requests=0, latency=[]), None, id="nothing-counted-yet"),
        pytest.param(None, None, None, id="no-report"),
        pytest.param(None, lying(requests=-5, latency=hist(b3=-5)), "requests -5 is negative",
                     id="negative-requests"),
        pytest.param(None, lying(errors=-40), "errors -40 is negative", id="negative-errors"),
        pytest.param(None, lying(failures=-1), "failures -1 is negative", id="negative-failures"),
        pytest.param(None, lying(errors=50), "errors 50 > requests 10", id="errors-over-requests"),
        pytest.param(None, lying(latency=hist(b3=7)), "latency buckets add up to 7, not 10",
                     id="histogram-total-mismatched"),
        pytest.param(None, lying(latency=[]), f"latency has 0 buckets, not {NB}",
                     id="histogram-missing"),
        pytest.param(None, lying(latency=[10, 0, 0]), f"latency has 3 buckets, not {NB}",
                     id="wrong-bucket-count"),
        pytest.param(None, lying(latency=hist(b3=12, b4=-2)), "latency bucket 4 is -2",
                     id="negative-bucket"),
        pytest.param(None, lying(latency=[float("nan")] + [0] * (NB - 1)),
                     "latency bucket 0 is nan", id="nan-latency"),
        pytest.param(None, lying(latency=[*hist(b3=9)[:-1], float("inf")]),
                     f"latency bucket {NB - 1} is inf", id="inf-latency"),
        pytest.param(None, RouterStats(epoch=float("nan")), "epoch nan is not a finite time",
                     id="nan-epoch"),
        pytest.param(lying(requests=20, latency=hist(b3=20)), lying(),
                     "requests went from 20 to 10 within one router epoch",
                     id="counters-backwards"),
        pytest.param(lying(latency=hist(b3=5, b4=5)), lying(requests=12, latency=hist(b3=12)),
                     "latency bucket 4 went from 5 to 0 within one router epoch",
                     id="bucket-backwards"),
        pytest.param(lying(errors=99), lying(requests=30, latency=hist(b3=30)),
                     "at the window's start: slot 'b': errors 99 > requests 10",
                     id="invalid-start"),
        pytest.param(lying(errors=99), msgspec.structs.replace(lying(), epoch=2.0), None,
                     id="invalid-start-of-another-epoch-is-not-read"),
        pytest.param(None, mirrored(), None, id="mirror-consistent"),
        pytest.param(None, mirrored(mismatched=11), "mirror: mismatched 11 > compared 10",
                     id="mirror-mismatched-over-compared"),
        pytest.param(None, mirrored(compared=-10, mismatched=0), "mirror: compared -10 is neg",
                     id="mirror-negative"),
        pytest.param(None, mirrored(live_latency=hist(b2=3)),
                     "mirror: live_latency buckets add up to 3, not 10",
                     id="mirror-histogram-total-mismatched"),
        pytest.param(mirrored(mismatched=5), mirrored(mismatched=2),
                     "mirror: mismatched went from 5 to 2 within one router epoch",
                     id="mirror-backwards"),
        # Each snapshot holds, their difference does not: a node's way to feed the gates more
        # errors than requests (the sequential analysis then raised a math domain error,
        # dropping the rollout's driver at every resync: a hung rollout).
        pytest.param(lying(), lying(errors=5),
                     "slot 'b': errors grew by 5, requests by 0, within one router epoch",
                     id="errors-grew-more-than-requests"),
        pytest.param(mirrored(), mirrored(mismatched=6),
                     "mirror: mismatched grew by 5, compared by 0, within one router epoch",
                     id="mismatches-grew-more-than-comparisons"),
    ],
)
def test_distrust_table(start: RouterStats | None, end: RouterStats | None,
                        says: str | None) -> None:
    """Figures no real router can produce are named with why; consistent ones are trusted."""
    why = distrust(start, end)
    if says is None:
        assert why is None
    else:
        assert why is not None and says in why, why
