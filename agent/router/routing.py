"""A router config, validated and turned into what the proxy consults per request (pure).

``build_routing`` refuses a config that makes no sense with one line saying what and why (the
router then keeps its previous config). The ``Routing`` it returns is replaced as a whole on every
reconfigure, so a request sees either the old or the new config, never a mix; its balancer starts
fresh, which is what a weight switch means.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.router.balance import SmoothWeighted
from agent.router.control import RouterConfig, Upstream
from agent.router.errors import RouterConfigError
from agent.router.http11 import _TOKEN as HEADER_NAME  # the request parser's rule for names
from agent.router.http11 import RequestHead
from protocol.cohort import (
    BUCKETS,
    HOW_ASSIGN,
    NEW,
    OLD,
    SPLIT,
    Cohort,
    CohortError,
    share_of,
)
from protocol.messages import SLOTS, CohortSpec, MirrorSpec

if TYPE_CHECKING:
    from agent.router.stats import CohortCounters

COOKIE_MAX_AGE = b"2592000"  # an assigned cohort cookie lasts 30 days (longer than any rollout)


@dataclass(slots=True)
class Routing:
    """What one config means for the next requests."""

    config: RouterConfig
    upstreams: dict[str, Upstream]
    balancer: SmoothWeighted
    weights: dict[str, int]  # as configured, for stats
    mirror: MirrorSpec | None = None
    mirror_target: Upstream | None = None  # None when off or the shadow is unhealthy
    mirror_methods: frozenset[str] = frozenset()
    ignore_headers: frozenset[bytes] = frozenset()
    ignore_json_fields: tuple[str, ...] = ()
    mirror_keep_headers: frozenset[bytes] = frozenset()  # credentials the shadow gets anyway
    reasons: str = field(default="")  # why a slot may not serve users, for the 503 body
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    cohort: Cohort | None = None
    share: int = 0  # buckets of the cohort on the new slot (``protocol.cohort.share_of``)
    new_ok: bool = False  # the cohort's new slot is healthy (may serve allowed users at weight 0)
    old_ok: bool = False
    old: str = ""

    def pick(self) -> str | None:
        return self.balancer.pick()

    def pick_for(self, req: RequestHead, ip: str) -> tuple[str | None, str, int, bytes]:
        """The slot for one request under the cohort rule, how it was chosen
        (``protocol.cohort.HOW_*``), the key's hash (0: none) and the Set-Cookie line to add to
        the answer (b"": none).

        Stickiness never fails a request: a chosen slot that is not healthy gives way to the
        other. Behind a trusted proxy the client address is the one the proxy saw."""
        cohort = self.cohort
        assert cohort is not None  # callers check: the hot path without a rule stays as it was
        if req.forwarded and self.trusts(ip):
            # The last entry of all its lines, joined in order (as they go upstream): a proxy
            # may add a line of its own below the client's.
            xff = b",".join(v for n, v in req.headers if v and n.lower() == b"x-forwarded-for")
            last = xff.rsplit(b",", 1)[-1].strip()
            if last:
                ip = last.decode("latin-1")
        side, how, h = cohort.choose(req.headers, ip, self.share)
        cookie = b""
        if how == HOW_ASSIGN:
            value = secrets.token_urlsafe(18).encode("ascii")
            h = cohort.hash_of(value)
            side = NEW if h % BUCKETS < self.share else OLD
            cookie = (b"Set-Cookie: " + cohort.key_name + b"=" + value
                      + b"; Path=/; Max-Age=" + COOKIE_MAX_AGE + b"; HttpOnly; SameSite=Lax\r\n")
        if side == SPLIT:
            return self.balancer.pick(), how, h, cookie
        if side == NEW:
            if self.new_ok:
                return cohort.new, how, h, cookie
        elif self.old_ok:
            return self.old, how, h, cookie
        return self.balancer.pick(), how, h, cookie

    def pick_counted(self, req: RequestHead, ip: str,
                     counters: CohortCounters | None) -> tuple[str | None, bytes]:
        """``pick_for``, counted in ``counters``: the slot (None: no healthy one) and the
        Set-Cookie line to add to the answer (b"": none). Both paths of the router use it."""
        slot, how, h, cookie = self.pick_for(req, ip)
        if counters is not None:
            counters.observe(how, slot or "", h)
        return slot, cookie

    def trusts(self, ip: str) -> bool:
        """Whether a peer at ``ip`` is a trusted proxy (its X-Forwarded-For is believed)."""
        if not self.trusted_proxies:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack listener sees IPv4 peers this way
        return any(addr in net for net in self.trusted_proxies)


def _check_port(port: int, what: str, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise RouterConfigError(f"{what} {port} is not a TCP port ({low}-65535)")


def _header_names(names: list[str], what: str) -> frozenset[bytes]:
    """Lower-case header names as the proxy compares them; refuses what is not a name."""
    for name in names:
        if not (name.isascii() and HEADER_NAME.fullmatch(name.encode("ascii"))):
            raise RouterConfigError(f"{what} mirror header {name!r} is not a header name")
    return frozenset(name.lower().encode("ascii") for name in names)


def build_routing(cfg: RouterConfig) -> Routing:
    """Validate ``cfg`` and build its routing; raises RouterConfigError with the reason."""
    if not cfg.service:
        raise RouterConfigError("service name is empty")
    if not cfg.listen_host:
        raise RouterConfigError("listen_host is empty")
    _check_port(cfg.listen_port, "listen_port", allow_zero=True)
    if cfg.drain_timeout < 0:
        raise RouterConfigError(f"drain_timeout {cfg.drain_timeout} is negative")
    if cfg.max_connections < 1:
        raise RouterConfigError(f"max_connections {cfg.max_connections} is below 1")
    if not cfg.body_timeout > 0:
        raise RouterConfigError(
            f"body_timeout {cfg.body_timeout} is not a positive number of seconds"
        )
    trusted = _networks(cfg.trusted_proxies)
    upstreams: dict[str, Upstream] = {}
    for up in cfg.upstreams:
        if up.slot not in SLOTS:
            raise RouterConfigError(f"unknown slot {up.slot!r} (slots are {', '.join(SLOTS)})")
        if up.slot in upstreams:
            raise RouterConfigError(f"slot {up.slot} is configured twice")
        _check_port(up.port, f"slot {up.slot} port", allow_zero=False)
        if up.weight < 0:
            raise RouterConfigError(f"slot {up.slot} weight {up.weight} is negative")
        upstreams[up.slot] = up
    mirror = cfg.mirror
    target: Upstream | None = None
    if mirror is not None:
        shadow = upstreams.get(mirror.slot)
        if shadow is None:
            raise RouterConfigError(f"mirror slot {mirror.slot!r} has no upstream configured")
        if shadow.weight > 0:
            raise RouterConfigError(
                f"mirror slot {mirror.slot} also serves users (weight {shadow.weight}); "
                "set its weight to 0 to shadow it"
            )
        if not 0 <= mirror.percent <= 100:
            raise RouterConfigError(f"mirror percent {mirror.percent} is outside 0-100")
        target = shadow if shadow.healthy and mirror.percent > 0 else None
    serving = [
        (up.slot, up.weight)
        for up in upstreams.values()
        if up.healthy and up.weight > 0
    ]
    reasons = "; ".join(
        f"slot {up.slot} {'unhealthy' if not up.healthy else 'weight 0'}"
        for up in upstreams.values()
        if not (up.healthy and up.weight > 0)
    ) or "no slot configured"
    routing = Routing(
        config=cfg,
        upstreams=upstreams,
        balancer=SmoothWeighted(sorted(serving)),
        weights={up.slot: up.weight for up in upstreams.values()},
        mirror=mirror,
        mirror_target=target,
        mirror_methods=frozenset(m.upper() for m in mirror.methods) if mirror else frozenset(),
        ignore_headers=_header_names(mirror.ignore_headers, "ignored") if mirror else frozenset(),
        ignore_json_fields=tuple(mirror.ignore_json_fields) if mirror else (),
        mirror_keep_headers=_header_names(mirror.keep_headers, "kept") if mirror else frozenset(),
        reasons=reasons,
        trusted_proxies=trusted,
    )
    if cfg.cohort is not None:
        _attach_cohort(routing, cfg.cohort)
    return routing


def _attach_cohort(routing: Routing, spec: CohortSpec) -> None:
    """Give ``routing`` the compiled cohort rule and the share of buckets on the new slot: its
    weight over both slots' weights as configured, healthy or not, so that a slot's health
    flapping moves no user (the chosen slot gives way for the moment instead)."""
    try:
        cohort = Cohort(spec)
    except CohortError as exc:
        raise RouterConfigError(f"cohort: {exc}") from None
    new = routing.upstreams.get(cohort.new)
    routing.old = "a" if cohort.new == "b" else "b"
    old = routing.upstreams.get(routing.old)
    routing.cohort = cohort
    routing.share = share_of(new.weight if new else 0, old.weight if old else 0)
    routing.new_ok = new is not None and new.healthy
    routing.old_ok = old is not None and old.healthy and old.weight > 0


def _networks(entries: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``trusted_proxies`` as networks (an address is a network of one), or RouterConfigError."""
    nets = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise RouterConfigError(
                f"trusted_proxies entry {entry!r} is not an IP address or network"
            ) from None
    return tuple(nets)
