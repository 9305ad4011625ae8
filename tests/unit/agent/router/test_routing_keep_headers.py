"""The kept mirror headers on the agent's side: from the signed desired state, through the
reconciler's Route action and the router's control socket, to the routing the proxy reads."""

from __future__ import annotations

import msgspec
import pytest

from agent.reconcile import ReleaseInfo, Route, ServiceView, SlotView, reconcile
from agent.router.control import REQUEST_DECODER, Configure, RouterConfig, Upstream
from agent.router.errors import RouterConfigError
from agent.router.routing import build_routing
from protocol.codec import decode, encode
from protocol.messages import DesiredState, MirrorSpec, ReleaseRef
from protocol.signing import generate_seed, public_key, sign, verify

V1 = ReleaseRef(service="hello", version="1.0.0", digest="sha256:11")
V2 = ReleaseRef(service="hello", version="2.0.0", digest="sha256:22")
KEPT = MirrorSpec(slot="b", percent=10, keep_headers=["x-foo", "Cookie"])


def desired(mirror: MirrorSpec) -> DesiredState:
    return DesiredState(fleet="f", node="n", service="hello", generation=2,
                        slots={"a": V1, "b": V2}, weights={"a": 100, "b": 0}, mirror=mirror)


def test_kept_headers_survive_the_signed_envelope() -> None:
    """A signed desired state carries the kept headers to the agent unchanged."""
    seed = generate_seed()
    got = verify(sign(seed, desired(KEPT)), [public_key(seed)], fleet="f", node="n",
                 service="hello", min_generation=1)
    assert got.mirror == KEPT


def test_a_mirror_from_an_older_coordinator_keeps_nothing() -> None:
    """A MirrorSpec without the field (an older coordinator) decodes as keeping no header."""
    raw = encode(MirrorSpec(slot="b", percent=10))
    old = msgspec.json.encode({k: v for k, v in msgspec.json.decode(raw).items()
                               if k != "keep_headers"})
    assert decode(MirrorSpec, old).keep_headers == []


def test_the_reconciler_routes_the_desired_mirror_as_it_is() -> None:
    """Once the shadow slot is healthy, the Route action carries the desired MirrorSpec whole."""
    def up(slot: str, ref: ReleaseRef) -> SlotView:
        return SlotView(slot=slot, status="healthy", digest=ref.digest, version=ref.version,
                        since=0.0, generation=1)

    local = ServiceView(
        service="hello", slots={"a": up("a", V1), "b": up("b", V2)},
        releases={r.digest: ReleaseInfo(r.digest, port=8080, start_timeout=30, drain=2)
                  for r in (V1, V2)},
        applied_weights={"a": 100},
    )
    assert reconcile(desired(KEPT), local, 2.0) == [Route({"a": 100, "b": 0}, KEPT)]


def config(mirror: MirrorSpec) -> RouterConfig:
    return RouterConfig(service="hello", listen_host="127.0.0.1", listen_port=0, mirror=mirror,
                        upstreams=[Upstream(slot="a", port=1, weight=1, healthy=True),
                                   Upstream(slot="b", port=2, weight=0, healthy=True)])


def test_the_router_config_carries_them_to_the_routing() -> None:
    """Over the control socket and into the routing: lower-case names the proxy matches."""
    wire = msgspec.json.encode(Configure(config=config(KEPT)))
    got = REQUEST_DECODER.decode(wire)
    assert isinstance(got, Configure)
    routing = build_routing(got.config)
    assert routing.mirror_keep_headers == frozenset({b"x-foo", b"cookie"})
    assert build_routing(config(MirrorSpec(slot="b", percent=10))).mirror_keep_headers == (
        frozenset())


@pytest.mark.parametrize("name", ["bad name", "x\r\nInjected: 1", "caf\u00e9", ""])
def test_the_router_refuses_what_is_not_a_header_name(name: str) -> None:
    """A kept or ignored name that is not a token is refused with the reason, not a crash."""
    with pytest.raises(RouterConfigError, match="is not a header name"):
        build_routing(config(MirrorSpec(slot="b", percent=10, keep_headers=[name])))
    with pytest.raises(RouterConfigError, match="is not a header name"):
        build_routing(config(MirrorSpec(slot="b", percent=10, ignore_headers=[name])))
