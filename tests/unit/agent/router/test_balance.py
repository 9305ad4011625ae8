"""Smooth weighted round-robin and config validation: pure, no sockets."""

from __future__ import annotations

from collections import Counter

import pytest

from agent.router.balance import SmoothWeighted
from agent.router.control import RouterConfig, Upstream
from agent.router.errors import RouterConfigError
from agent.router.routing import build_routing
from protocol.messages import MirrorSpec


@pytest.mark.parametrize(
    ("weights", "rounds"),
    [({"a": 1, "b": 1}, 10), ({"a": 3, "b": 1}, 7), ({"a": 95, "b": 5}, 3), ({"a": 1}, 5)],
)
def test_split_is_exact_over_each_cycle(weights: dict[str, int], rounds: int) -> None:
    """Over every sum(weights) picks each candidate is chosen exactly its weight times."""
    b = SmoothWeighted(sorted(weights.items()))
    total = sum(weights.values())
    for _ in range(rounds):
        assert Counter(b.pick() for _ in range(total)) == weights


def test_picks_are_interleaved() -> None:
    """Weights 3:1 interleave (a a b a), they do not bunch."""
    b = SmoothWeighted([("a", 3), ("b", 1)])
    assert [b.pick() for _ in range(4)] == ["a", "a", "b", "a"]


def test_zero_weights_and_empty() -> None:
    """Zero-weight candidates are never picked; no candidate picks None."""
    b = SmoothWeighted([("a", 0), ("b", 2)])
    assert {b.pick() for _ in range(10)} == {"b"}
    assert SmoothWeighted([]).pick() is None
    assert SmoothWeighted([("a", 0)]).pick() is None


def test_fallback_order_is_heaviest_first() -> None:
    """others() lists the remaining candidates heaviest first."""
    assert SmoothWeighted([("a", 1), ("b", 5)]).others("a") == ["b"]
    assert SmoothWeighted([("a", 1), ("b", 5)]).others("b") == ["a"]


def _cfg(*ups: Upstream, mirror: MirrorSpec | None = None) -> RouterConfig:
    return RouterConfig(
        service="s", listen_host="127.0.0.1", listen_port=8080, upstreams=list(ups), mirror=mirror
    )


def test_routing_serves_only_healthy_positive_weights() -> None:
    """Unhealthy and weight-0 slots are not candidates; the 503 reason names them."""
    r = build_routing(
        _cfg(Upstream(slot="a", port=1, weight=0, healthy=True),
             Upstream(slot="b", port=2, weight=9, healthy=False))
    )
    assert r.pick() is None
    assert r.reasons == "slot a weight 0; slot b unhealthy"
    assert r.weights == {"a": 0, "b": 9}


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (_cfg(Upstream(slot="c", port=1, weight=1, healthy=True)), "unknown slot 'c'"),
        (_cfg(Upstream(slot="a", port=0, weight=1, healthy=True)), "slot a port 0"),
        (_cfg(Upstream(slot="a", port=1, weight=-1, healthy=True)), "weight -1 is negative"),
        (
            _cfg(Upstream(slot="a", port=1, weight=1, healthy=True),
                 Upstream(slot="a", port=2, weight=1, healthy=True)),
            "configured twice",
        ),
        (
            _cfg(Upstream(slot="a", port=1, weight=1, healthy=True),
                 mirror=MirrorSpec(slot="b", percent=10)),
            "no upstream",
        ),
        (
            _cfg(Upstream(slot="a", port=1, weight=1, healthy=True),
                 Upstream(slot="b", port=2, weight=1, healthy=True),
                 mirror=MirrorSpec(slot="b", percent=10)),
            "also serves users",
        ),
        (
            _cfg(Upstream(slot="a", port=1, weight=1, healthy=True),
                 Upstream(slot="b", port=2, weight=0, healthy=True),
                 mirror=MirrorSpec(slot="b", percent=101)),
            "outside 0-100",
        ),
    ],
)
def test_bad_configs_are_refused_with_the_reason(cfg: RouterConfig, message: str) -> None:
    """Each nonsensical config is refused with a message naming what is wrong."""
    with pytest.raises(RouterConfigError, match=message):
        build_routing(cfg)


def test_unhealthy_shadow_is_not_mirrored() -> None:
    """A mirror to an unhealthy slot is accepted but sends no copies."""
    r = build_routing(
        _cfg(Upstream(slot="a", port=1, weight=1, healthy=True),
             Upstream(slot="b", port=2, weight=0, healthy=False),
             mirror=MirrorSpec(slot="b", percent=50, ignore_headers=["X-Id"]))
    )
    assert r.mirror_target is None
    assert r.ignore_headers == frozenset({b"x-id"})
    assert r.mirror_methods == frozenset({"GET", "HEAD"})
