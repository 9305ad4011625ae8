"""Agents and the coordinator as real processes on a real nats-server: presence end to end."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import pytest

from coordinator.auth.enroll import CA, AuthDir
from coordinator.dev.broker import Broker, find_nats_server, free_port
from coordinator.dev.devfleet import Child, DevFleet
from coordinator.runtime.daemon import FORGOTTEN_EVERY
from protocol import creds as creds_file
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.errors import BusError
from protocol.messages import ApiReply, Event, Heartbeat, NodeInfo, NodesRequest
from tests.integration.procs import (
    HEARTBEAT,
    fleetwave,
    nodes_json,
    online,
    read_text,
    reaping,
    shipped_auth_conf,
    spawn_agent,
    spawn_coordinator,
    wait_until,
)

NODES = ["node-1", "node-2", "node-3"]
LABELS = {"node-1": {"zone": "a", "role": "web"}, "node-2": {"zone": "b", "role": "web"},
          "node-3": {"zone": "a", "role": "db"}}


async def events_of(bus: Bus, kind: str) -> list[Event]:
    out = []
    stream = subjects.events_stream(bus.fleet)
    async for raw in bus.stream_messages(stream, subjects.event(bus.fleet, kind)):
        out.append(decode(Event, raw))
    return out


async def test_three_agents_come_online_with_their_labels(broker: Broker, tmp_path: Path) -> None:
    """Three agent processes show online with their labels and figures in `fleetwave nodes`."""
    agents = [spawn_agent(broker.url, n, tmp_path, labels=LABELS[n]) for n in NODES]
    async with reaping(spawn_coordinator(broker.url, tmp_path), *agents):
        # Online from its registration; its figures come with its first heartbeat after it.
        rows = await wait_until(
            lambda: nodes_json(broker.url),
            lambda r: online(r, NODES) and all(r[n]["cpu_percent"] is not None for n in NODES),
            timeout=30, what="three nodes online with their figures",
        )
        for n in NODES:
            assert rows[n]["labels"] == LABELS[n]
            assert rows[n]["cpu_percent"] is not None and rows[n]["mem_percent"] > 0
            assert set(rows[n]) == {"id", "labels", "online", "unheard", "last_seen", "cpu_percent",
                                    "mem_percent", "services", "cordon"}
            assert rows[n]["cordon"] is None
        zone_a = await nodes_json(broker.url, "--selector", "zone=a")
        assert sorted(zone_a) == ["node-1", "node-3"]
        assert sorted(await nodes_json(broker.url, "-l", "zone=a", "-l", "role=db")) == ["node-3"]
        # Every agent wrote its NodeInfo to the nodes bucket (after it published it on the
        # register subject, which is what made it online: waited for, not read at once).
        bus = await Bus.connect(broker.url, "default")
        try:
            for n in NODES:
                entry = await wait_until(
                    lambda n=n: bus.kv_get(subjects.nodes_bucket("default"), n),
                    lambda e: e is not None, timeout=10, what=f"{n} in the nodes bucket")
                assert entry is not None
                assert decode(NodeInfo, entry.value or b"").labels == LABELS[n]
        finally:
            await bus.close()
    assert [a.returncode for a in agents] == [0, 0, 0]  # SIGTERM is a clean stop


async def test_killed_agent_goes_offline_and_comes_back(tmp_path: Path) -> None:
    """An agent killed with SIGKILL is offline within 3 heartbeats and online after a restart."""
    async with DevFleet(tmp_path, agents=2, heartbeat_interval=HEARTBEAT) as fleet:
        await fleet.agent(2).kill()
        await fleet.wait_online(["node-2"], online=False, timeout=3 * HEARTBEAT + 3)
        assert (await fleet.wait_online(["node-1"], timeout=1))  # the other one is untouched
        await fleet.agent(2).start()
        await fleet.wait_online(["node-2"], timeout=10)
        bus = await Bus.connect(fleet.nats_url, "default")
        try:
            offline = await wait_until(
                lambda: events_of(bus, "node.offline"), lambda ev: len(ev) >= 1, timeout=10,
                what="a node.offline event",
            )
            assert [e.node for e in offline] == ["node-2"]
            assert "no heartbeat" in offline[0].message
            online_events = await events_of(bus, "node.online")
            assert [e.node for e in online_events].count("node-2") == 2
        finally:
            await bus.close()


async def test_a_forgotten_node_leaves_the_fleet_until_its_agent_comes_back(
        tmp_path: Path) -> None:
    """``fleetwave forget``: an online node or an unknown one is refused (exit 2, one line,
    nothing changed); once its agent is stopped and it shows offline, the node leaves ``nodes``
    and the nodes bucket, node.forgotten says who; its agent started again, it is a node again."""
    async with DevFleet(tmp_path, agents=2, heartbeat_interval=HEARTBEAT) as fleet:
        url = fleet.nats_url
        code, out, err = await fleetwave("forget", "node-2", nats_url=url)
        assert (code, out) == (2, "") and "node node-2 is online: stop its agent first" in err
        code, _, err = await fleetwave("forget", "node-9", nats_url=url)
        assert code == 2 and "no node 'node-9' in fleet 'default'" in err, err
        assert len(err.strip().splitlines()) == 1, err
        await fleet.agent(2).kill()
        await fleet.wait_online(["node-2"], online=False, timeout=3 * HEARTBEAT + 3)
        code, out, err = await fleetwave("forget", "node-2", nats_url=url)
        assert (code, out) == (0, "node-2: forgotten\n"), err
        assert sorted(await nodes_json(url)) == ["node-1"]
        bus = await Bus.connect(url, "default")
        try:
            assert await bus.kv_get(subjects.nodes_bucket("default"), "node-2") is None
            told = await wait_until(lambda: events_of(bus, "node.forgotten"), lambda ev: ev,
                                    timeout=10, what="the node.forgotten event")
            assert [e.node for e in told] == ["node-2"] and "forgotten by" in told[0].message
        finally:
            await bus.close()
        await fleet.agent(2).start()
        await fleet.wait_online(["node-2"], timeout=10)
        assert sorted(await nodes_json(url)) == ["node-1", "node-2"]


async def test_a_node_forgotten_unheard_leaves_the_coordinators_table(tmp_path: Path) -> None:
    """An offline node whose registration left the nodes bucket without the coordinator hearing
    it (a standby cut off when ``fleetwave forget`` ran, or a key purged by hand) leaves its
    table at its next look (``FORGOTTEN_EVERY``), as a restart would have done; an offline node
    still registered stays."""
    async with DevFleet(tmp_path, agents=3, heartbeat_interval=HEARTBEAT) as fleet:
        url = fleet.nats_url
        await fleet.agent(2).kill()
        await fleet.agent(3).kill()
        await fleet.wait_online(["node-2", "node-3"], online=False, timeout=3 * HEARTBEAT + 3)
        bus = await Bus.connect(url, "default")
        try:
            await bus.kv_purge_keys(subjects.nodes_bucket("default"), "node-2")
        finally:
            await bus.close()
        await wait_until(lambda: nodes_json(url), lambda rows: "node-2" not in rows,
                         timeout=FORGOTTEN_EVERY + 10, what="node-2 to leave the table")
        assert sorted(await nodes_json(url)) == ["node-1", "node-3"]
        said = await read_text(fleet.coordinator.log_path)
        assert "node node-2 forgotten: its registration is gone from the nodes bucket" in said


async def test_agents_reconnect_after_the_broker_restarts(broker: Broker, tmp_path: Path) -> None:
    """Broker SIGKILLed and restarted on its store: agents and coordinator come back alone."""
    agents = [spawn_agent(broker.url, n, tmp_path, labels=LABELS[n]) for n in NODES]
    coordinator = spawn_coordinator(broker.url, tmp_path)
    async with reaping(coordinator, *agents):
        await wait_until(lambda: nodes_json(broker.url), lambda r: online(r, NODES),
                         timeout=30, what="three nodes online")
        # Online is a heartbeat; the registration may come later (it retries with backoff
        # until the coordinator has made the buckets): each must have registered once first.
        for n in NODES:
            await wait_until(lambda n=n: read_text(tmp_path / "logs" / f"{n}.log"),
                             lambda log: "registration 1" in log, timeout=30,
                             what=f"{n} to register")
        await broker.kill()
        await asyncio.sleep(3 * HEARTBEAT + 0.5)  # an outage longer than the offline deadline
        await broker.start()
        await wait_until(lambda: nodes_json(broker.url), lambda r: online(r, NODES),
                         timeout=30, what="three nodes online again after the broker restart")
        assert all(a.running for a in agents) and coordinator.running
        for n in NODES:  # registration follows the reconnect, perhaps after a heartbeat or two
            await wait_until(lambda n=n: read_text(tmp_path / "logs" / f"{n}.log"),
                             lambda log: "registration 2" in log, timeout=30,
                             what=f"{n} to register again after reconnecting")


async def test_agent_waits_for_the_coordinator_to_create_the_buckets(
    broker: Broker, tmp_path: Path
) -> None:
    """An agent started before any coordinator keeps retrying and registers once one runs."""
    agent = spawn_agent(broker.url, "early", tmp_path, labels={"zone": "a"})
    async with reaping(agent):
        log = tmp_path / "logs" / "early.log"
        await wait_until(lambda: read_text(log), lambda t: "cannot register" in t, timeout=10,
                         what="the agent to report the missing bucket")
        assert agent.running
        async with reaping(spawn_coordinator(broker.url, tmp_path)):
            rows = await wait_until(lambda: nodes_json(broker.url), lambda r: online(r, ["early"]),
                                    timeout=30, what="the early agent online")
            assert rows["early"]["labels"] == {"zone": "a"}
            await wait_until(lambda: read_text(log), lambda t: "registered node early" in t,
                             timeout=30, what="the agent to register")


async def test_restarted_coordinator_knows_offline_nodes(broker: Broker, tmp_path: Path) -> None:
    """A coordinator started after an agent left lists it offline, from the nodes bucket."""
    agent = spawn_agent(broker.url, "gone", tmp_path, labels={"zone": "b"})
    async with reaping(spawn_coordinator(broker.url, tmp_path), agent):
        await wait_until(lambda: nodes_json(broker.url), lambda r: online(r, ["gone"]),
                         timeout=30, what="the agent online")
        # A heartbeat makes it online; what a later coordinator reads is its registration in
        # the nodes bucket, which may come later (the agent retries until the bucket exists).
        bus = await Bus.connect(broker.url, "default")
        try:
            await wait_until(lambda: bus.kv_get(subjects.nodes_bucket("default"), "gone"),
                             lambda e: e is not None, timeout=30, what="the registration")
        finally:
            await bus.close()
    async with reaping(spawn_coordinator(broker.url, tmp_path)):
        rows = await wait_until(lambda: nodes_json(broker.url), lambda r: "gone" in r,
                                timeout=30, what="the new coordinator to answer")
        assert rows["gone"]["online"] is False and rows["gone"]["labels"] == {"zone": "b"}


async def test_malformed_messages_do_not_crash_the_coordinator(
    broker: Broker, tmp_path: Path
) -> None:
    """Garbage heartbeats, registrations and requests are ignored or refused; it keeps serving."""
    coordinator = spawn_coordinator(broker.url, tmp_path)
    async with reaping(coordinator):
        bus = await Bus.connect(broker.url, "default")
        try:
            await wait_until(lambda: nodes_json(broker.url), lambda r: r == {}, timeout=30,
                             what="the coordinator to answer")
            f = "default"
            await bus.publish(subjects.heartbeat(f, "x"), b"\xff not json")
            await bus.publish(subjects.heartbeat(f, "x"), b'{"node": 5}')
            await bus.publish(subjects.heartbeat(f, "y"), encode(Heartbeat(node="spoofed")))
            await bus.publish(subjects.register(f, "x"), b"[1, 2]")
            await bus.publish(subjects.register(f, "x"), encode(NodeInfo(id="bad id!")))
            await bus.publish(subjects.register(f, "z"), encode(NodeInfo(id="other")))
            bad = decode(ApiReply, await bus.request(subjects.api(f, "tests", "nodes"), b"{{"))
            assert (bad.ok, bad.code) == (False, "usage")
            good = decode(ApiReply, await bus.request(
                subjects.api(f, "tests", "nodes"), encode(NodesRequest())))
            assert (good.ok, good.data) == (True, [])  # nothing above made a node appear
            await bus.publish(subjects.heartbeat(f, "real"), encode(Heartbeat(node="real")))
            rows = await wait_until(lambda: nodes_json(broker.url), lambda r: "real" in r,
                                    timeout=5, what="a valid heartbeat to count")
            assert list(rows) == ["real"]
        finally:
            await bus.close()
        assert coordinator.running
        coordinator.signal(signal.SIGTERM)
        assert await coordinator.wait(10) == 0
    log = await read_text(tmp_path / "logs" / "coordinator.log")
    assert "Traceback" not in log
    assert "claims to be from node 'spoofed'" in log
    assert "registration on fw.default.register.z claims to be node 'other'" in log
    assert log.count("ignored malformed heartbeat from x") == 1  # once per source, not a flood


class _ShippedAuth:
    """deploy/nats/auth.conf as shipped, on a free port and a temp store, with the users `fleetwave
    auth` generates for the coordinator, operator "operator", node-1 and node-2."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.auth = AuthDir(tmp_path / "auth")
        self.auth.init("default", (), "operator")
        for node in ("node-1", "node-2"):
            self.auth.add("node", node)
        store = tmp_path / "js"
        store.mkdir()
        conf = store / "auth.conf"
        conf.write_text(shipped_auth_conf(
            host="127.0.0.1", port=self.port, monitor_port=free_port(), store_dir=store,
            server_name="fleetwave-1", auth=self.auth.path))
        self.server = Child("nats", [find_nats_server(), "-c", str(conf)],
                            tmp_path / "logs" / "nats.log")

    def args(self, role: str, name: str) -> list[str]:
        """The client options of one identity (--creds, --tls-ca)."""
        return ["--creds", str(self.auth.creds_path(role, name)),
                "--tls-ca", str(self.auth.path / CA)]

    async def bus(self, role: str, name: str) -> Bus:
        return await Bus.connect(self.url, "default", connect_deadline=2,
                                 creds=creds_file.load(self.auth.creds_path(role, name)),
                                 tls_ca=str(self.auth.path / CA))

    async def serving(self) -> bool:
        try:
            await (await self.bus("operator", "operator")).close()
        except BusError:
            return False
        return True

    async def nodes(self) -> dict[str, dict[str, Any]]:
        return await nodes_json(self.url, client=self.args("operator", "operator"))

    def agent(self, tmp_path: Path, node: str, labels: dict[str, str]) -> Child:
        return spawn_agent(self.url, node, tmp_path, labels=labels,
                           extra=self.args("node", node))

    def coordinator(self, tmp_path: Path) -> Child:
        return spawn_coordinator(self.url, tmp_path, extra=self.args("coordinator", "coordinator"))


async def test_auth_example_confines_an_agent_to_its_own_keys(tmp_path: Path) -> None:
    """With deploy/nats/auth.conf an agent registers and beats, but cannot write others' keys;
    no process logs its credentials' seed."""
    shipped = _ShippedAuth(tmp_path)
    agent = shipped.agent(tmp_path, "node-1", {"zone": "a"})
    async with reaping(shipped.server):
        await wait_until(shipped.serving, bool, timeout=10,
                         what="the auth example server to accept clients")
        async with reaping(shipped.coordinator(tmp_path), agent):
            rows = await wait_until(shipped.nodes, lambda r: online(r, ["node-1"]), timeout=30,
                                    what="node-1 online through the auth example")
            assert rows["node-1"]["labels"] == {"zone": "a"}
            bus = await shipped.bus("node", "node-1")
            try:
                await bus.kv_put(subjects.observed_bucket("default"), "node-1.hello", b"{}")
                for bucket, key in [
                    (subjects.observed_bucket("default"), "node-2.hello"),
                    (subjects.nodes_bucket("default"), "node-2"),
                    (subjects.desired_bucket("default"), "node-1.hello"),
                ]:
                    with pytest.raises((BusError, TimeoutError)):
                        async with asyncio.timeout(2):
                            await bus.kv_put(bucket, key, b"{}")
            finally:
                await bus.close()
    log = await read_text(tmp_path / "logs" / "nats.log")
    assert 'Publish Violation - Subject "$KV.fw-default-observed.node-2.hello"' in log
    for role, name in (("node", "node-1"), ("coordinator", "coordinator")):
        seed = creds_file.load(shipped.auth.creds_path(role, name)).seed
        assert seed not in await read_text(tmp_path / "logs" / f"{name}.log"), name
    assert 'Publish Violation - Subject "$KV.fw-default-desired.node-1.hello"' in log


async def test_a_node_cannot_register_for_another_node(tmp_path: Path) -> None:
    """Through the auth example, node-1's credentials can neither rewrite node-2's registration
    (labels, liveness) nor invent a node, on any registration subject they can reach."""
    shipped = _ShippedAuth(tmp_path)
    agents = [shipped.agent(tmp_path, n, LABELS[n]) for n in ("node-1", "node-2")]
    async with reaping(shipped.server):
        await wait_until(shipped.serving, bool, timeout=10,
                         what="the auth example server to accept clients")
        async with reaping(shipped.coordinator(tmp_path), *agents):
            await wait_until(shipped.nodes, lambda r: online(r, ["node-1", "node-2"]),
                             timeout=30, what="node-1 and node-2 online through the auth example")
            forged = NodeInfo(id="node-2", labels={"zone": "forged"})
            ghost = NodeInfo(id="ghost", labels={"zone": "a"})
            bus = await shipped.bus("node", "node-1")
            try:
                # Every subject a registration could take: the shared one of old, the sender's
                # own, and the victim's; the server or the coordinator must refuse each.
                for subject in ("fw.default.register", "fw.default.register.node-2",
                                "fw.default.register.node-1"):
                    for info in (ghost, forged):
                        with contextlib.suppress(BusError):
                            await bus.publish(subject, encode(info))
                await bus.flush()
            finally:
                await bus.close()
            log = tmp_path / "logs" / "coordinator.log"
            rows = await wait_until(
                lambda: _rows_and_log(shipped, log),
                lambda r: r[0]["node-2"]["labels"] != LABELS["node-2"] or "ghost" in r[0]
                or "claims to be node 'ghost'" in r[1],
                timeout=15, what="the coordinator to handle the forged registrations",
            )
            nodes, _ = await _rows_and_log(shipped, log)
            assert rows[0]["node-2"]["labels"] == LABELS["node-2"]
            assert sorted(nodes) == ["node-1", "node-2"] and nodes["node-2"]["labels"] == \
                LABELS["node-2"]
        # The nodes bucket: node-1 may write only its own key, and a coordinator that starts
        # later must not take what is there as another node's registration.
        bus = await shipped.bus("node", "node-1")
        try:
            await bus.kv_put(subjects.nodes_bucket("default"), "node-1", encode(ghost))
        finally:
            await bus.close()
        async with reaping(shipped.coordinator(tmp_path)):
            nodes = await wait_until(shipped.nodes, lambda r: "node-2" in r,
                                     timeout=30, what="a new coordinator to load the nodes bucket")
            assert "ghost" not in nodes and nodes["node-2"]["labels"] == LABELS["node-2"]


async def _rows_and_log(shipped: _ShippedAuth, log: Path) -> tuple[dict[str, Any], str]:
    return await shipped.nodes(), await read_text(log)


async def _connects(url: str) -> bool:
    try:
        bus = await Bus.connect(url, "default", connect_deadline=0.5)
    except BusError:
        return False
    await bus.close()
    return True


async def test_lame_duck_moves_clients_to_another_server(tmp_path: Path) -> None:
    """A server entering lame-duck mode (SIGUSR2) makes a long-lived Bus move to the other one."""
    ports = [free_port() for _ in range(2)]
    routes = [free_port() for _ in range(2)]
    servers = []
    for i in range(2):
        conf = tmp_path / f"s{i}.conf"
        conf.write_text(
            f'server_name: "s{i}"\nhost: "127.0.0.1"\nport: {ports[i]}\n'
            'lame_duck_grace_period: "1s"\nlame_duck_duration: "30s"\n'
            f'cluster {{ name: "ldm"\n listen: "127.0.0.1:{routes[i]}"\n'
            f'  routes: ["nats-route://127.0.0.1:{routes[1 - i]}"] }}\n'
        )
        servers.append(Child(f"s{i}", [find_nats_server(), "-c", str(conf)],
                             tmp_path / "logs" / f"s{i}.log"))
    async with reaping(*servers):
        first = f"nats://127.0.0.1:{ports[0]}"
        await wait_until(lambda: _connects(first), bool, timeout=10, what="server s0")
        bus = await Bus.connect(f"{first},nats://127.0.0.1:{ports[1]}", "default",
                                reconnect_forever=True)
        try:
            # nats-py shuffles the server list: find out where it landed and shut that one down.
            here = await wait_until(lambda: _at(bus), lambda p: p in ports, timeout=5,
                                    what="the bus to connect")
            assert here is not None
            leaving = ports.index(here)
            servers[leaving].signal(signal.SIGUSR2)
            await wait_until(lambda: _at(bus), lambda p: p == ports[1 - leaving], timeout=30,
                             what="the bus to move to the other server")
            assert bus.lame_ducks == 1
        finally:
            await bus.close()


async def _at(bus: Bus) -> int | None:
    url = bus.nc.connected_url
    return url.port if url is not None else None
