"""The router's edge options in its config: validated, and what trusting a proxy means (pure)."""

from __future__ import annotations

import pytest

from agent.router.control import RouterConfig
from agent.router.errors import RouterConfigError
from agent.router.routing import build_routing


def _cfg(**options: object) -> RouterConfig:
    return RouterConfig(
        service="s", listen_host="127.0.0.1", listen_port=8080,
        **options,  # type: ignore[arg-type]  # each case passes other fields
    )


def test_trusted_proxies_are_addresses_and_networks() -> None:
    """Addresses and networks both count; IPv4-mapped IPv6 peers match their IPv4 network."""
    r = build_routing(_cfg(trusted_proxies=["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]))
    assert r.trusts("10.1.2.3") and r.trusts("192.0.2.7") and r.trusts("2001:db8::1")
    assert r.trusts("::ffff:10.9.9.9")
    assert not r.trusts("192.0.2.8") and not r.trusts("127.0.0.1") and not r.trusts("unknown")


def test_nobody_is_trusted_by_default() -> None:
    """Without trusted_proxies no peer's X-Forwarded-For is believed."""
    assert not build_routing(_cfg()).trusts("127.0.0.1")


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies entry '10.0.0.0/33'"),
        ({"trusted_proxies": ["proxy.example"]}, "is not an IP address or network"),
        ({"max_connections": 0}, "max_connections 0 is below 1"),
        ({"body_timeout": 0.0}, "body_timeout 0.0 is not a positive"),
        ({"body_timeout": float("nan")}, "body_timeout nan"),
    ],
)
def test_bad_edge_options_are_refused(options: dict[str, object], reason: str) -> None:
    """Each nonsensical edge option refuses the config with a one-line reason."""
    with pytest.raises(RouterConfigError, match=reason):
        build_routing(_cfg(**options))
