"""End to end, ``fleetwave remove`` (issue 19 part 1): a dev fleet of 3 real agents on
127.0.62.1-3 running the example ``hello`` service behind their routers, driven with the real CLI
under steady traffic.

What holds: removing the service during traffic fails no request while a node's router still
takes connections (requests in flight when it closes are answered: 2.3.0 takes 200 ms for each),
and after it a connection is refused at once, not left hanging; the slots' processes and the
routers are gone; ``nodes`` lists the service nowhere and ``status`` shows every node done with
no version; the release stays in each node's cache. Removing it again, or a service no node has,
is one line and exit 2, and changes nothing. ``fleetwave rollback hello`` after the removal
deploys the removed version again from the cache; a removal of one node by ``--selector`` then a
plain ``deploy`` puts the service back there too; a running removal rolled back by the operator
starts the removed node's router and slot again.

The load: per node, one worker on keep-alive connections and one opening a connection per
request. A request sent on a reused keep-alive connection that the router closes before any
byte of an answer (it closes idle connections when it stops) is retried once on a new
connection, as HTTP clients do for idempotent requests (RFC 9112 section 9.3.1); that new
connection is then answered or refused. Anything else that is not an answer below 500 (a reset
mid-answer, a timeout, a 5xx) is a failure.

Figures (``pytest -s``): requests answered per node during the removal, the time from the
removal's start to each node refusing, and how long the re-deploy from the cache took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from coordinator.dev.devfleet import DevFleet
from tests.integration.e2e_support import DEPLOY_TIMEOUT, PORT, push, service_pids, serving, status
from tests.integration.procs import fleetwave, nodes_json, wait_until

SUBNET = "127.0.62"
NODES = ("node-1", "node-2", "node-3")
SLOW = "2.3.0"  # answers GET / after 200 ms: a request is nearly always in flight
REQUEST_TIMEOUT = 5.0


@dataclass
class NodeLoad:
    """What one node's traffic met: answers, refusals, failures, and when."""

    answered: int = 0
    refused: int = 0
    retried: int = 0
    failures: list[str] = field(default_factory=list)
    first_refused: float | None = None
    last_answer: float = 0.0
    last: Counter[str] = field(default_factory=Counter)  # each worker's last outcome


class Load:
    """Per node, a keep-alive worker and a connection-per-request worker sending GET /."""

    def __init__(self, fleet: DevFleet) -> None:
        self.hosts = {f"node-{i}": fleet.host(i) for i in range(1, len(fleet.agents) + 1)}
        self.nodes = {n: NodeLoad() for n in self.hosts}
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        for node, host in self.hosts.items():
            for keep_alive in (True, False):
                self._tasks.append(asyncio.create_task(self._worker(node, host, keep_alive)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopped.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), REQUEST_TIMEOUT * 3)

    async def _worker(self, node: str, host: str, keep_alive: bool) -> None:
        got = self.nodes[node]
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        reused = False
        outcome = ""
        while not self._stopped.is_set():
            if outcome == "refused":  # nothing listens: look again a little later
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), 0.05)
            if conn is None:
                try:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, PORT),
                                                  REQUEST_TIMEOUT)
                    reused = False
                except ConnectionRefusedError:
                    outcome = "refused"
                    got.refused += 1
                    got.first_refused = got.first_refused or time.monotonic()
                    got.last[str(keep_alive)] = outcome
                    continue
                except (OSError, TimeoutError) as exc:
                    got.failures.append(f"connect: {type(exc).__name__}: {exc}")
                    outcome = "failed"
                    continue
            try:
                code, closes = await asyncio.wait_for(_get(conn, host, keep_alive),
                                                      REQUEST_TIMEOUT)
            except _NoAnswer as exc:
                _close(conn)
                conn = None
                if reused:  # an idle keep-alive connection closed under us: retry anew
                    got.retried += 1
                    continue
                got.failures.append(f"request: {exc}")
                outcome = "failed"
                continue
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                _close(conn)
                conn = None
                got.failures.append(f"answer: {type(exc).__name__}: {exc}")
                outcome = "failed"
                continue
            if code >= 500:
                got.failures.append(f"answered {code}")
                outcome = "failed"
            else:
                got.answered += 1
                got.last_answer = time.monotonic()
                outcome = "answered"
            got.last[str(keep_alive)] = outcome
            reused = True
            if closes or not keep_alive:
                _close(conn)
                conn = None
        if conn is not None:
            _close(conn)


class _NoAnswer(Exception):
    """The connection ended before any byte of an answer."""


async def _get(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str,
               keep_alive: bool) -> tuple[int, bool]:
    """One GET /: (status, the connection closes after it)."""
    reader, writer = conn
    how = "keep-alive" if keep_alive else "close"
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: {how}\r\n\r\n".encode())
        await writer.drain()
        first = await reader.read(1)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise _NoAnswer(f"{type(exc).__name__}: {exc}") from None
    if not first:
        raise _NoAnswer("closed before any byte of an answer")
    head = first + await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split(" ", 2)[1])
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                   (line.partition(":") for line in lines[1:] if ":" in line))
    await reader.readexactly(int(headers.get("content-length", "0")))
    return code, headers.get("connection", "").lower() == "close"


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    with contextlib.suppress(Exception):
        conn[1].close()


def fleet_at(tmp_path: Path) -> DevFleet:
    return DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5, subnet=SUBNET)


async def deploy(url: str, version: str, *flags: str) -> None:
    code, out, err = await fleetwave("deploy", "hello", version, *flags, nats_url=url,
                                     timeout=DEPLOY_TIMEOUT)
    assert code == 0, f"deploy of {version} failed ({code}): {out}{err}"


async def all_serve(fleet: DevFleet, version: str) -> None:
    await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {version},
                     timeout=30, what=f"every node serving {version}")


def routers(fleet: DevFleet) -> dict[str, int]:
    """The pid listening on each node's public port, by node (psutil's view)."""
    hosts = {fleet.host(i): f"node-{i}" for i in range(1, len(fleet.agents) + 1)}
    return {hosts[c.laddr.ip]: c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == PORT
            and c.laddr.ip in hosts and c.pid is not None}


async def refused_at_once(host: str) -> float:
    """Seconds a connection to ``host``'s public port takes to be refused; fails otherwise."""
    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, PORT), 2.0)
    except ConnectionRefusedError:
        return time.monotonic() - started
    writer.close()
    raise AssertionError(f"{host}:{PORT} still takes connections")


async def rollout_count(url: str) -> int:
    code, out, err = await fleetwave("rollouts", "-o", "json", nats_url=url)
    assert code == 0, err
    return len(json.loads(out))


def cached(fleet: DevFleet) -> dict[str, set[str]]:
    """The releases unpacked in each node's cache (directory names: digests)."""
    return {n: {p.name for p in (fleet.dir / n / "releases").iterdir()
                if p.is_dir() and not p.name.startswith(".")} for n in NODES}


async def test_remove_under_load_then_redeploy(tmp_path: Path) -> None:
    """Removing hello under load fails no request until each router stops, then refuses at
    once; processes, routers and listings are gone, the cache is kept; a second removal or an
    unknown service is refused (exit 2, nothing changed); rollback re-deploys from the cache."""
    async with fleet_at(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, SLOW, "2.0.0")
        await deploy(url, SLOW, "--batch", "100%")
        await all_serve(fleet, SLOW)
        before = await wait_until(lambda: service_pids(fleet), lambda p: len(p) == 3,
                                  timeout=30, what="one service process per node")
        router_pids = routers(fleet)
        assert sorted(router_pids) == list(NODES), router_pids
        cache = cached(fleet)
        listed = await nodes_json(url)
        assert all("hello" in r["services"] for r in listed.values()), listed

        async with Load(fleet) as load:
            await wait_until(lambda: _answered(load), lambda n: min(n.values()) >= 5,
                             timeout=30, what="traffic answered on every node")
            started = time.monotonic()
            code, out, err = await fleetwave("remove", "hello", nats_url=url,
                                             timeout=DEPLOY_TIMEOUT)
            assert code == 0, f"remove failed ({code}): {out}{err}"
            await wait_until(lambda: _answered(load), lambda _: all(
                n.last and set(n.last.values()) == {"refused"} for n in load.nodes.values()),
                timeout=10, what="every worker refused")
        for node, got in load.nodes.items():
            print(f"{node}: {got.answered} answered, {got.refused} refused, {got.retried} "
                  f"retried; refused {got.first_refused - started:.2f}s after the removal "
                  "started" if got.first_refused else f"{node}: never refused")
            assert got.failures == [], f"{node}: {got.failures[:5]}"
            assert got.refused and got.answered >= 5, (node, got)

        for i in range(1, 4):
            assert await refused_at_once(fleet.host(i)) < 1.0
        assert await service_pids(fleet) == {}, "a slot's process outlived the removal"
        for node, pid in router_pids.items():
            assert not psutil.pid_exists(pid), f"{node}'s router (pid {pid}) is still running"
        assert set(before) and not routers(fleet)

        st = await status(url)
        assert (st["strategy"], st["state"], st["version"]) == ("remove", "succeeded", ""), st
        assert st["from_version"] == SLOW
        assert {n: (p["state"], p["version"]) for n, p in st["nodes"].items()} == \
            dict.fromkeys(NODES, ("done", "")), st["nodes"]
        await wait_until(lambda: nodes_json(url),
                         lambda rows: len(rows) == 3 and all("hello" not in r["services"]
                                                             for r in rows.values()),
                         timeout=10, what="no node listing hello")
        assert cached(fleet) == cache, "the removal emptied a node's release cache"

        # Nothing left to remove, and a service no node has: one line, exit 2, nothing changed.
        count = await rollout_count(url)
        for name in ("hello", "nosuch"):
            code, out, err = await fleetwave("remove", name, nats_url=url)
            assert code == 2 and out == "", (name, code, out, err)
            assert err.count("\n") == 1 and "nothing to remove" in err, err
        assert await rollout_count(url) == count

        # rollback after a finished removal: the removed version again, from the cache.
        begun = time.monotonic()
        code, out, err = await fleetwave("rollback", "hello", nats_url=url)
        assert code == 0 and f"deploying hello {SLOW}" in out, (code, out, err)
        await all_serve(fleet, SLOW)
        print(f"re-deployed {SLOW} on 3 nodes from the cache in {time.monotonic() - begun:.1f}s")
        assert cached(fleet) == cache


async def test_remove_one_node_by_selector_then_deploy(tmp_path: Path) -> None:
    """``--selector zone=b`` removes hello from node-2 alone while the others keep serving;
    a later deploy of the service reaches node-2 again."""
    async with fleet_at(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await deploy(url, "1.0.0", "--batch", "100%")
        await all_serve(fleet, "1.0.0")
        code, out, err = await fleetwave("remove", "hello", "--selector", "zone=b",
                                         nats_url=url, timeout=DEPLOY_TIMEOUT)
        assert code == 0, f"remove failed ({code}): {out}{err}"
        now = await serving(fleet)
        assert now["node-1"] == now["node-3"] == "1.0.0", now
        assert await refused_at_once(fleet.host(2)) < 1.0
        st = await status(url)
        assert list(st["nodes"]) == ["node-2"] and st["state"] == "succeeded", st

        await deploy(url, "2.0.0", "--batch", "100%")
        await all_serve(fleet, "2.0.0")
        await wait_until(lambda: service_pids(fleet),
                         lambda p: sorted(p.values()) == [(n, s, "2.0.0") for n, s in
                                                          (("node-1", "b"), ("node-2", "a"),
                                                           ("node-3", "b"))],
                         timeout=30, what="one 2.0.0 process per node, node-2's in slot a")


async def _answered(load: Load) -> dict[str, int]:
    return {n: got.answered for n, got in load.nodes.items()}


async def test_a_running_removal_rolled_back_brings_the_service_back(tmp_path: Path) -> None:
    """``fleetwave rollback hello`` while a removal runs restores every node it touched: the
    removed node's router and slot start again and every node serves the old version."""
    async with fleet_at(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0")
        await deploy(url, "1.0.0", "--batch", "100%")
        await all_serve(fleet, "1.0.0")
        code, out, err = await fleetwave("remove", "hello", "--detach", nats_url=url)
        assert code == 0, f"remove --detach failed ({code}): {out}{err}"
        rid = out.strip()
        await wait_until(lambda: status(url, rid), lambda s: s["nodes"]["node-1"]["state"] ==
                         "done", timeout=30, what="node-1 removed")
        assert await refused_at_once(fleet.host(1)) < 1.0
        code, out, err = await fleetwave("rollback", "hello", nats_url=url)
        assert code == 0 and f"rollout {rid}: rolling back" in out, (code, out, err)
        st = await wait_until(lambda: status(url, rid), lambda s: s["state"] != "running",
                              timeout=60, what=f"rollout {rid} to end")
        assert st["state"] == "rolled_back", st
        await all_serve(fleet, "1.0.0")
