"""The router's cohort picks: sticky by key, monotone, never failing a request for stickiness."""

from __future__ import annotations

import pytest

from agent.router.control import RouterConfig, Upstream
from agent.router.errors import RouterConfigError
from agent.router.http11 import parse_request
from agent.router.routing import build_routing
from protocol.cohort import HOW_ALLOW, HOW_ASSIGN, HOW_DENY, HOW_FALLBACK, HOW_KEY
from protocol.messages import CohortSpec


def _routing(
    new_w: int, *, new_ok: bool = True, old_ok: bool = True, **cohort: object
) -> object:
    spec: dict[str, object] = {"key": "header:X-User", "salt": "r-1", "new": "b"}
    spec.update(cohort)
    return build_routing(RouterConfig(
        service="s", listen_host="127.0.0.1", listen_port=8080,
        upstreams=[Upstream(slot="a", port=9001, weight=100 - new_w, healthy=old_ok),
                   Upstream(slot="b", port=9002, weight=new_w, healthy=new_ok)],
        cohort=CohortSpec(**spec),  # type: ignore[arg-type]
    ))


def _req(*headers: str) -> object:
    lines = "".join(f"{h}\r\n" for h in headers)
    return parse_request(f"GET / HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())


def _pick(routing: object, req: object, ip: str = "10.0.0.9") -> tuple[str | None, str]:
    slot, how, _h, _cookie = routing.pick_for(req, ip)  # type: ignore[attr-defined]
    return slot, how


def test_same_user_same_slot_and_monotone() -> None:
    """A user keeps one slot request after request, and only moves a → b as the weight grows."""
    users = [f"X-User: u{i}" for i in range(300)]
    before: dict[str, str | None] = {}
    for weight in (0, 5, 20, 50, 100):
        r = _routing(weight)
        for u in users:
            slot = _pick(r, _req(u))[0]
            assert slot == _pick(r, _req(u))[0]
            if before.get(u) == "b":
                assert slot == "b", f"{u} moved back at weight {weight}"
            before[u] = slot
    assert set(before.values()) == {"b"}


def test_share_of_users() -> None:
    """At weight 20 about a fifth of the users get the new slot."""
    r = _routing(20)
    new = sum(_pick(r, _req(f"X-User: user-{i}"))[0] == "b" for i in range(4000))
    assert 0.17 < new / 4000 < 0.23


@pytest.mark.parametrize(("new_ok", "old_ok", "weight", "want"), [
    (False, True, 90, "a"),  # the new slot is down: its users are served by the old one
    (True, False, 10, "b"),  # the old slot is down: everyone gets the new one
])
def test_unhealthy_choice_gives_way(new_ok: bool, old_ok: bool, weight: int, want: str) -> None:
    """Stickiness never fails a request: the other healthy slot serves."""
    r = _routing(weight, new_ok=new_ok, old_ok=old_ok)
    assert _pick(r, _req("X-User: u1"))[0] == want


def test_allow_deny_at_weight_zero() -> None:
    """At weight 0 only allow-listed users reach the staged slot; deny wins over allow."""
    r = _routing(0, allow=["header:X-Beta=1"], deny=["cookie:tier=gold"])
    assert _pick(r, _req("X-Beta: 1")) == ("b", HOW_ALLOW)
    assert _pick(r, _req("X-Beta: 1", "Cookie: tier=gold")) == ("a", HOW_DENY)
    assert _pick(r, _req("X-User: u1")) == ("a", HOW_KEY)
    assert _pick(r, _req()) == ("a", HOW_FALLBACK)


def test_assign_cookie() -> None:
    """A browser without the cookie gets one (HttpOnly, SameSite=Lax, 30 days), picked by it."""
    r = _routing(50, key="cookie:fw_cohort", assign_cookie=True)
    slot, how, _h, cookie = r.pick_for(_req(), "10.0.0.1")  # type: ignore[attr-defined]
    assert how == HOW_ASSIGN and slot in ("a", "b")
    assert cookie.startswith(b"Set-Cookie: fw_cohort=") and cookie.endswith(b"\r\n")
    for attr in (b"Path=/", b"Max-Age=2592000", b"HttpOnly", b"SameSite=Lax"):
        assert attr in cookie
    value = cookie.split(b"=", 1)[1].split(b";", 1)[0].decode()
    again = _pick(r, _req(f"Cookie: fw_cohort={value}"))
    assert again == (slot, HOW_KEY)


def test_trusted_proxy_client_address() -> None:
    """Behind a trusted proxy an ip key uses the address the proxy saw, not the proxy's."""
    spec = {"key": "ip", "salt": "r-1", "new": "b"}
    r = build_routing(RouterConfig(
        service="s", listen_host="127.0.0.1", listen_port=8080, trusted_proxies=["10.9.0.0/16"],
        upstreams=[Upstream(slot="a", port=9001, weight=50, healthy=True),
                   Upstream(slot="b", port=9002, weight=50, healthy=True)],
        cohort=CohortSpec(**spec),  # type: ignore[arg-type]
    ))
    sides = {_pick(r, _req(f"X-Forwarded-For: 192.0.2.{i}"), "10.9.0.1")[0] for i in range(40)}
    assert sides == {"a", "b"}


def test_bad_cohort_config_is_refused() -> None:
    """A rule the router cannot apply is refused, and the old config stays (RouterConfigError)."""
    with pytest.raises(RouterConfigError, match="cohort"):
        _routing(10, key="query:x")


def test_behind_a_trusted_proxy_the_client_cannot_choose_its_ip_bucket() -> None:
    """A proxy that adds its own X-Forwarded-For line below the client's (HAProxy's option
    forwardfor) is believed for the last entry over all lines, whatever the client wrote."""
    spec = {"key": "ip", "salt": "r-1", "new": "b"}
    r = build_routing(RouterConfig(
        service="s", listen_host="127.0.0.1", listen_port=8080, trusted_proxies=["10.9.0.0/16"],
        upstreams=[Upstream(slot="a", port=9001, weight=50, healthy=True),
                   Upstream(slot="b", port=9002, weight=50, healthy=True)],
        cohort=CohortSpec(**spec),  # type: ignore[arg-type]
    ))

    def key_hash(*xff: str) -> int:
        lines = "".join(f"X-Forwarded-For: {v}\r\n" for v in xff)
        req = parse_request(f"GET / HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
        return r.pick_for(req, "10.9.0.1")[2]

    seen = key_hash("192.0.2.7")
    assert {key_hash(f"198.51.100.{i}", "192.0.2.7") for i in range(40)} == {seen}
    assert key_hash("198.51.100.1, 203.0.113.5", "192.0.2.7") == seen
    assert key_hash("192.0.2.99", "192.0.2.7") != key_hash("192.0.2.99")
