"""End to end: cordon, uncordon and drain on a dev fleet of 3 real agents (127.0.63.1..3, the
example ``hello`` service behind each node's router on port 8080), with the real CLI, under load.

Prints (run with -s) the drain's figures: when the readiness path first said 503 (t1), when the
first connection to the drained router was refused or cut (t2), and how many requests were in
flight at t2 and finished."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from agent.manager.routing import router_socket
from agent.router.health import READY_PATH
from coordinator.dev.devfleet import DevFleet
from tests.integration.e2e_support import (
    DEPLOY_TIMEOUT,
    PORT,
    deploy_detached,
    events_of,
    install,
    loaded,
    push,
    service_pids,
    serving,
    settle,
    status,
)
from tests.integration.procs import fleetwave, nodes_json, wait_until

SUBNET = "127.0.63"
GRACE = 2.0


async def get(host: str, path: str = "/", timeout: float = 5.0) -> int:
    """One GET on a fresh connection; its status. Raises ConnectionRefusedError when nothing
    listens, ``Cut`` when the connection was taken but no whole response came back."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, PORT)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                         .encode())
            await writer.drain()
            raw = await reader.read()
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise Cut(f"{type(exc).__name__}: {exc}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, sep, _ = raw.partition(b"\r\n\r\n")
    if not sep:
        raise Cut(f"no whole response ({len(raw)} bytes)")
    return int(head.split(b" ", 2)[1])


class Cut(Exception):
    """A connection that was accepted, then closed without a whole response."""


async def cli_ok(url: str, *args: str) -> str:
    code, out, err = await fleetwave(*args, nats_url=url)
    assert code == 0, f"fleetwave {' '.join(args)} failed ({code}): {out}{err}"
    return out


async def test_a_cordoned_node_keeps_its_version_through_a_rolling_rollout(
        tmp_path: Path) -> None:
    """Bad input changes nothing (exit 2, one line); a rolling rollout under load skips the
    cordoned node-3 (which keeps 1.0.0) and says so; once uncordoned a later rollout moves it,
    and cordoning it while that rollout runs leaves it a target (it moves too); a drain then is
    refused."""
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0", "2.3.0")
        await install(fleet, "1.0.0")

        for args, says in (
            (("cordon", "node-9"), "no node 'node-9' in fleet 'default'"),
            (("uncordon", "node-9"), "no node 'node-9' in fleet 'default'"),
            (("drain", "node-9"), "no node 'node-9' in fleet 'default'"),
            (("cordon", "--selector", "zone=nowhere"), "no node matches selector zone=nowhere"),
            (("cordon",), "name one node or give --selector"),
            (("drain", "node-3", "--grace", "5"), "--grace"),
        ):
            code, out, err = await fleetwave(*args, nats_url=url)
            assert code == 2, f"{args}: exit {code}: {out}{err}"
            assert says in err and len(err.strip().splitlines()) == 1, (args, err)
            assert "Traceback" not in err
        assert all(row["cordon"] is None for row in (await nodes_json(url)).values())

        assert "node-3: cordoned" in await cli_ok(url, "cordon", "node-3")
        assert "node-3: cordoned (already)" in await cli_ok(url, "cordon", "node-3")
        cordon = (await nodes_json(url))["node-3"]["cordon"]
        assert cordon["by"] and cordon["drain"] is False and cordon["time"] > 0
        assert "cordoned by" in await cli_ok(url, "nodes")

        async with loaded(fleet) as traffic:
            code, out, err = await fleetwave("deploy", "hello", "2.0.0", "--batch", "1",
                                             nats_url=url, timeout=DEPLOY_TIMEOUT)
            assert code == 0, f"rolling 2.0.0 failed ({code}): {out}{err}"
            # A staged rollout of two waves ends within a moment of its first switch: the load
            # goes on until it has seen the new version (it had not, once, in CI: 84 requests
            # all answered by 1.0.0 before the deploy returned).
            await settle(traffic, "2.0.0", 10)
        report = traffic.report
        assert report.failed == 0, report.failures[:5]
        assert report.requests > 50 and {"1.0.0", "2.0.0"} <= set(report.versions)
        assert "node-3 cordoned: skipped" in out
        assert await serving(fleet) == {"node-1": "2.0.0", "node-2": "2.0.0", "node-3": "1.0.0"}
        st = await status(url)
        assert st["state"] == "succeeded" and st["report"]["skipped_cordoned"] == ["node-3"]
        assert sorted(st["nodes"]) == ["node-1", "node-2"]
        assert "node-3 cordoned: skipped" in await cli_ok(url, "status", st["id"])
        skipped = [e for e in await events_of(url, st["id"])
                   if e["kind"] == "rollout.node.skipped"]
        assert [(e["node"], e["message"]) for e in skipped] == [
            ("node-3", "node-3 cordoned: skipped")]
        fleet_events = await events_of(url, "")
        cordoned = [e for e in fleet_events if e["kind"] == "node.cordoned"]
        assert [(e["node"], e["who"]) for e in cordoned] == [("node-3", cordon["by"])]

        # A selector picks nodes by label (zone=b is node-2); uncordon returns them.
        out = await cli_ok(url, "cordon", "--selector", "zone=b")
        assert out.strip() == "node-2: cordoned"
        assert "node-2: uncordoned" in await cli_ok(url, "uncordon", "--selector", "zone=b")
        assert "node-3: uncordoned" in await cli_ok(url, "uncordon", "node-3")
        rows = await nodes_json(url)
        assert all(row["cordon"] is None for row in rows.values())
        assert [e["node"] for e in await events_of(url, "")
                if e["kind"] == "node.uncordoned"] == ["node-2", "node-3"]

        # Uncordoned, node-3 is a target again; cordoned while the rollout runs, it stays one.
        rid = await deploy_detached(url, "2.3.0", "--batch", "1", "--bake", "2s")
        await wait_until(lambda: status(url, rid), lambda s: s["state"] == "running",
                         timeout=30, what="the rollout to run")
        assert "node-3: cordoned" in await cli_ok(url, "cordon", "node-3")
        code, out, err = await fleetwave("drain", "node-3", nats_url=url)
        assert code == 1 and f"rollout {rid} targets it" in err, (code, out, err)
        assert (await nodes_json(url))["node-3"]["cordon"]["drain"] is False
        final = await wait_until(lambda: status(url, rid), lambda s: s["state"] != "running",
                                 timeout=90, what="the rollout to end")
        assert final["state"] == "succeeded", final
        assert "node-3" in final["nodes"] and "skipped_cordoned" not in final["report"]
        assert set((await serving(fleet)).values()) == {"2.3.0"}


@dataclass
class Drained:
    """What clients of node-3 saw while it was drained: the readiness path's answers, and every
    request sent straight to its router (start, end, outcome)."""

    host: str
    ready: list[tuple[float, int | str]] = field(default_factory=list)
    requests: list[tuple[float, float, int | str]] = field(default_factory=list)

    async def poll_ready(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.ready.append((time.monotonic(), await get(self.host, READY_PATH)))
            except (OSError, Cut, TimeoutError) as exc:
                self.ready.append((time.monotonic(), type(exc).__name__))
            await asyncio.sleep(0.02)  # the poll's period (as a load balancer's check interval)

    async def send(self, stop: asyncio.Event, offset: float) -> None:
        await asyncio.sleep(offset)  # staggered: some request is always in flight
        while not stop.is_set():
            started = time.monotonic()
            outcome: int | str
            try:
                outcome = await get(self.host)
            except ConnectionRefusedError:
                outcome = "refused"
            except (OSError, Cut, TimeoutError) as exc:
                outcome = f"cut: {type(exc).__name__} {exc}"
            self.requests.append((started, time.monotonic(), outcome))
            if outcome == "refused":
                await asyncio.sleep(0.02)  # (nothing listens: do not spin)

    def first_503(self) -> float:
        return min(t for t, answer in self.ready if answer == 503)

    def first_failure(self) -> float:
        """When the first request failed (refused or cut)."""
        return min(end for _, end, outcome in self.requests if outcome != 200)

    def in_flight_at_close(self) -> list[tuple[float, float, int | str]]:
        """The requests the router took before it stopped accepting (they were answered) and
        that ended after a connection was first refused: in flight when it closed."""
        closed = min(start for start, _, outcome in self.requests if outcome == "refused")
        return [r for r in self.requests if r[2] == 200 and r[0] < closed < r[1]]


@dataclass
class Balancer:
    """A load balancer in front of the three routers: it checks each node's readiness path
    every 100 ms and sends requests only to nodes whose last check said 200."""

    hosts: list[str]
    healthy: set[str] = field(default_factory=set)
    served: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    async def check(self, host: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                up = await get(host, READY_PATH, timeout=1.0) == 200
            except (OSError, Cut, TimeoutError):
                up = False
            (self.healthy.add if up else self.healthy.discard)(host)
            await asyncio.sleep(0.1)  # the check interval of the load balancer

    async def send(self, stop: asyncio.Event, n: int) -> None:
        while not stop.is_set():
            pool = sorted(self.healthy)
            if not pool:
                await asyncio.sleep(0.05)  # (every node out of service: wait for a check)
                continue
            host = pool[n % len(pool)]
            n += 1
            try:
                answer: int | str = await get(host)
            except (OSError, Cut, TimeoutError) as exc:
                answer = f"{type(exc).__name__} {exc}"
            if answer == 200:
                self.served[host] = self.served.get(host, 0) + 1
            else:
                self.failures.append(f"{host}: {answer}")


def router_pids(fleet: DevFleet, node: str) -> set[int]:
    """The router processes of ``node``: their argv names their control socket (under the data
    dir, or in the temp dir when that path is too long, as under pytest-xdist)."""
    sock = str(router_socket(fleet.dir / node, "hello"))
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info.get("cmdline") or []
        if "agent.router" in argv and sock in argv:
            found.add(proc.pid)
    return found


async def test_a_drained_node_says_503_before_any_connection_is_cut(tmp_path: Path) -> None:
    """drain node-3 under load (every GET / takes 200 ms): its readiness path says 503 at t1,
    the first refused or cut connection comes at t2 >= t1 + grace, every request its router
    took finished (none in flight lost), and a load balancer that checks the path loses no
    request; agent and router killed meanwhile, it stays drained; uncordon brings it back."""
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "2.3.0")
        await install(fleet, "2.3.0")
        hosts = [fleet.host(i) for i in (1, 2, 3)]
        assert [await get(h, READY_PATH) for h in hosts] == [200, 200, 200]

        node3 = Drained(fleet.host(3))
        lb = Balancer(hosts)
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(node3.poll_ready(stop))
            for k in range(3):
                tg.create_task(node3.send(stop, 0.07 * k))
            for h in hosts:
                tg.create_task(lb.check(h, stop))
            for n in range(4):
                tg.create_task(lb.send(stop, n))
            try:
                await wait_until(lambda: asyncio.sleep(0, set(lb.healthy)),
                                 lambda h: len(h) == 3, timeout=10, what="the balancer's checks")
                await asyncio.sleep(1.0)  # traffic through every node before the drain
                drained_at = time.monotonic()
                out = await cli_ok(url, "drain", "node-3", "--grace", f"{GRACE:g}s", "--wait")
                said, done = out.strip().splitlines()
                assert said == ("node-3: drained; its routers answer 503 on "
                                f"{READY_PATH} now and stop accepting after 2s"), out
                # --wait returned: the router neither accepts nor holds a connection.
                waited = time.monotonic() - drained_at
                assert done.startswith("node-3: drained after ") and done.endswith(
                    "s: no router on it accepts or holds a connection"), out
                with pytest.raises(ConnectionRefusedError):
                    await get(fleet.host(3))
                services = (await nodes_json(url))["node-3"]["services"]
                assert services["hello"]["drain"] == "drained", services
                await asyncio.sleep(1.0)  # the balancer keeps sending to the other nodes
            finally:
                stop.set()

        t1, t2 = node3.first_503(), node3.first_failure()
        assert drained_at < t1 < t2, (drained_at, t1, t2)
        assert t2 - t1 >= GRACE - 0.5, f"the router closed {t2 - t1:.2f}s after the first 503"
        cut = [o for _, _, o in node3.requests if isinstance(o, str) and o.startswith("cut")]
        assert cut == [], f"requests the router took and did not finish: {cut[:5]}"
        in_flight = node3.in_flight_at_close()
        assert in_flight, "no request was in flight when the router stopped accepting"
        assert lb.failures == [], lb.failures[:5]
        assert lb.served.get(fleet.host(3), 0) > 0 and lb.served.get(fleet.host(1), 0) > 0
        assert waited > t2 - drained_at  # (--wait returned after the router closed)
        print(f"\ndrain: readiness 503 after {t1 - drained_at:.3f}s (t1), first refused "
              f"connection {t2 - t1:.3f}s later (t2, grace {GRACE:g}s); {len(in_flight)} "
              f"requests in flight at t2 finished; load balancer: {sum(lb.served.values())} "
              f"requests, 0 failed; drain --wait returned after {waited:.1f}s")

        cordon = (await nodes_json(url))["node-3"]["cordon"]
        assert cordon["drain"] is True and cordon["grace"] == GRACE and cordon["by"]
        assert "drained by" in await cli_ok(url, "nodes")
        drained = [e for e in await events_of(url, "") if e["kind"] == "node.drained"]
        assert [(e["node"], e["who"], e["data"]["services"]) for e in drained] == [
            ("node-3", cordon["by"], ["hello"])]
        assert {node for node, _, _ in (await service_pids(fleet)).values()} == {
            "node-1", "node-2", "node-3"}  # the drained node's service keeps running

        # Level-triggered: agent and router of node-3 killed, the agent restarted; the new
        # router it starts takes the signed desired state and stays closed.
        log = fleet.dir / "node-3" / "logs" / "router-hello.log"
        configured = log.read_text().count("(drained)")
        old = router_pids(fleet, "node-3")
        assert old
        await fleet.agent(3).kill()
        for pid in old:
            with contextlib.suppress(ProcessLookupError):
                psutil.Process(pid).send_signal(signal.SIGKILL)
        await fleet.agent(3).start()
        await wait_until(lambda: asyncio.sleep(0, log.read_text().count("(drained)")),
                         lambda n: n > configured, timeout=30,
                         what="the restarted router to be configured drained")
        assert router_pids(fleet, "node-3").isdisjoint(old)
        try:
            await get(fleet.host(3))
            raise AssertionError("a drained node's new router accepted a connection")
        except ConnectionRefusedError:
            pass

        assert "node-3: uncordoned" in await cli_ok(url, "uncordon", "node-3")
        await wait_until(lambda: serving(fleet), lambda v: v["node-3"] == "2.3.0", timeout=30,
                         what="node-3 to serve again")
        assert await get(fleet.host(3), READY_PATH) == 200
        assert (await nodes_json(url))["node-3"]["cordon"] is None
        kinds = [e["kind"] for e in await events_of(url, "") if e["node"] == "node-3"
                 and e["kind"].startswith("node.") and e["kind"] not in ("node.online",
                                                                       "node.offline")]
        assert kinds[-4:] == ["node.cordoned", "node.drained", "node.undrained",
                              "node.uncordoned"], kinds

        # --wait gives up at --timeout with what is left, and the drain goes on.
        code, out, err = await fleetwave("drain", "node-2", "--grace", "30s", "--wait",
                                         "--timeout", "1s", nats_url=url)
        assert code == 1 and "node-2: drained; " in out, (code, out, err)
        assert err.startswith("fleetwave: node-2: still draining after 1s: hello (") and \
            len(err.strip().splitlines()) == 1, err
        assert (await nodes_json(url))["node-2"]["cordon"]["drain"] is True
        assert "node-2: uncordoned" in await cli_ok(url, "uncordon", "node-2")
