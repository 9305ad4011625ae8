"""coordinator.dev.cluster: the broker's cluster flags, parsed and checked before anything runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.dev import cluster
from coordinator.dev.broker import render_config
from coordinator.dev.cluster import (
    BrokerCluster,
    ClusterSpec,
    cluster_spec,
    is_self_route,
    parse_hostport,
    parse_routes,
)
from coordinator.errors import UsageError


@pytest.mark.parametrize(("value", "want"), [
    ("nats-route://a:6222,nats-route://b:6222", ("nats-route://a:6222", "nats-route://b:6222")),
    ("a:6222, b:6223", ("nats-route://a:6222", "nats-route://b:6223")),
    ("nats://10.0.0.1:6222", ("nats-route://10.0.0.1:6222",)),
    ("a:6222,a:6222", ("nats-route://a:6222",)),
])
def test_routes_are_normalised(value: str, want: tuple[str, ...]) -> None:
    """Routes may be written with nats-route://, nats:// or bare; duplicates go."""
    assert parse_routes(value) == want


@pytest.mark.parametrize("value", ["x:y", "http://a:6222", "a", "nats-route://a", ",",
                                   "nats-route://a:6222/path", "a:99999"])
def test_a_bad_route_is_one_line_naming_it(value: str) -> None:
    """A route that is not HOST:PORT is a UsageError naming what to write."""
    with pytest.raises(UsageError, match="route") as err:
        parse_routes(value)
    assert "\n" not in str(err.value)


def test_hostport() -> None:
    """--cluster-listen is HOST:PORT (IPv6 in brackets too), nothing else."""
    assert parse_hostport("0.0.0.0:6222", what="--cluster-listen") == ("0.0.0.0", 6222)
    assert parse_hostport("[::1]:6222", what="--cluster-listen") == ("::1", 6222)
    for bad in ("6222", ":6222", "host:", "host:0", "host:port"):
        with pytest.raises(UsageError, match="--cluster-listen"):
            parse_hostport(bad, what="--cluster-listen")


def test_flags_that_do_not_fit_together_are_refused() -> None:
    """--routes without --cluster-listen, or a cluster without --name, is a usage error."""
    assert cluster_spec(None, None, None) is None
    assert cluster_spec("solo", None, None) is None
    with pytest.raises(UsageError, match="--routes needs --cluster-listen"):
        cluster_spec("a", None, "b:6222")
    with pytest.raises(UsageError, match="needs --name"):
        cluster_spec(None, "0.0.0.0:6222", "b:6222")
    spec = cluster_spec("fw-1", "0.0.0.0:6222", "a:6222,b:6222")
    assert spec == ClusterSpec("fw-1", "0.0.0.0", 6222, ("nats-route://a:6222",
                                                         "nats-route://b:6222"))


def test_a_route_to_itself_is_recognised() -> None:
    """The same route list on every server: the one to itself is known as such."""
    spec = ClusterSpec("fw-1", "127.0.0.1", 6222, ())
    assert is_self_route("nats-route://127.0.0.1:6222", spec)
    assert is_self_route("nats-route://localhost:6222", spec)
    assert not is_self_route("nats-route://127.0.0.1:6223", spec)
    anywhere = ClusterSpec("fw-1", "0.0.0.0", 6222, ())
    assert is_self_route("nats-route://127.0.0.1:6222", anywhere)


def test_config_of_a_member_has_a_cluster_block() -> None:
    """A member's generated config names the cluster, its listen address and its routes, and
    keeps fsync on every write."""
    spec = ClusterSpec("fw-2", "127.0.0.1", 6223, ("nats-route://127.0.0.1:6222",))
    conf = render_config(host="127.0.0.1", port=4223, monitor_port=8223, store_dir=Path("/x"),
                         server_name="fw-2", cluster=spec)
    assert 'listen: "127.0.0.1:6223"' in conf and '"nats-route://127.0.0.1:6222"' in conf
    assert 'name: "fleetwave"' in conf and "sync_interval: always" in conf


def test_a_cluster_of_one_is_refused(tmp_path: Path) -> None:
    """A lone clustered server waits for peers for ever, so BrokerCluster wants 2 or more."""
    with pytest.raises(UsageError, match="at least 2"):
        BrokerCluster(tmp_path, 1)


async def test_route_trouble_is_said_once_per_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing routes are said once (not once a poll), their return once, a new loss once more."""
    states = [["r2 (connection refused)"]] * 3 + [[]] * 3 + [["r2 (no answer within 1s)"]] * 3
    polls = iter(states)
    stop = asyncio.Event()

    async def others(spec: ClusterSpec) -> list[str]:
        return ["nats-route://r2:6222"]

    async def problems(others: object, port: int) -> list[str]:
        found = next(polls, None)
        if found is None:  # the story is told: stop, with the route still missing
            stop.set()
            return states[-1]
        return found

    monkeypatch.setattr(cluster, "other_routes", others)
    monkeypatch.setattr(cluster, "route_problems", problems)
    said: list[str] = []
    spec = ClusterSpec("fw-1", "127.0.0.1", 6222, ("nats-route://r2:6222",))
    async with asyncio.timeout(10):
        await cluster.watch_routes(spec, 0, said.append, stop, grace=0.0, interval=0.001)
    assert [("cannot reach" in s, "routes up" in s) for s in said] == [
        (True, False), (False, True), (True, False)], said
    assert "connection refused" in said[0] and "--routes" in said[0]
