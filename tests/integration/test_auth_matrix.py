"""The attack matrix, part two: node-1's credentials against the JetStream API itself, every
coordinator API verb, the object store, streams, other nodes' events and watch consumers; a
replayed desired state; and the same matrix against ``deploy/nats/auth.conf`` as shipped, and
against a 3-server cluster of ``deploy/nats/cluster-N.conf`` as shipped, whose routes refuse
whoever lacks a certificate from the fleet's CA.

Each attempt is refused by the server (a "Violation" line in its log, no answer) or, where the
server lets the request through by design, changes nothing and leaks nothing (said at the
attempt); the agent's refusal of a replay is an ``agent.refused`` event; the fleet's desired,
observed and rollout state are the same afterwards. ``test_auth.py`` holds the first part.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import coordinator.dev.broker as broker_module
from coordinator.auth.enroll import CA, SERVER, SERVER_KEY, AuthDir
from coordinator.dev.devfleet import DevFleet
from protocol import creds as creds_file
from protocol import subjects
from protocol.bus import Bus, Entry
from protocol.codec import decode, encode
from protocol.errors import BusError
from protocol.messages import (
    DesiredState,
    Event,
    NodeInfo,
    ObservedState,
    Pace,
    ReleaseNotice,
    ReleaseRef,
    SignedEnvelope,
)
from protocol.signing import load_seed, sign
from tests.integration.e2e_support import DEPLOY_TIMEOUT, serving
from tests.integration.procs import (
    desired_states,
    fleetwave,
    hello_bundle,
    read_text,
    shipped_auth_conf,
    shipped_cluster_conf,
    wait_until,
)
from tests.integration.test_auth_cluster import _route_attempt, _routes

SUBNET = "127.0.52"
CLUSTER_SUBNET = "127.0.58"  # the shipped cluster's fleet
pytestmark = pytest.mark.holds(f"subnet {CLUSTER_SUBNET}")
F = "default"
DESIRED, OBSERVED = subjects.desired_bucket(F), subjects.observed_bucket(F)
KV_DESIRED = subjects.kv_stream(DESIRED)
RELEASES = subjects.releases_store(F)
# Verbs the coordinator's API serves (coordinator.api.rollouts, .runtime.daemon); the matrix
# also tries every endpoint the running coordinator announces ($SRV.INFO).
API_VERBS = (*subjects.WRITE_VERBS, "status", "rollouts", "nodes", "leader", "key")
# A forged word of a release pushed: every agent would fetch it (a download of the store's).
_NOTICE = ReleaseNotice(release=ReleaseRef(service="hello", version="6.6.6",
                                           digest="sha256:" + "0" * 64))
REFUSED_WAIT = 2.0  # a refused request gets no answer: how long each waits for one


# -- the fleet under attack -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def secure_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, shipped: bool,
                       brokers: int = 1) -> AsyncIterator[DevFleet]:
    """A --secure dev fleet of two nodes serving hello 1.0.0; with ``shipped`` its broker runs
    deploy/nats/auth.conf (its 3 brokers cluster-N.conf) instead of the config ``fleetwave
    broker --auth`` writes."""
    if shipped:
        monkeypatch.setattr(broker_module, "render_config",
                            shipped_auth_conf if brokers == 1 else shipped_cluster_conf)
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, secure=True,
                        brokers=brokers, subnet=SUBNET if brokers == 1 else CLUSTER_SUBNET,
                        ) as fleet:
        for v in ("1.0.0", "2.0.0"):
            code, _, err = await fleetwave(*fleet.client_args(), "release", "push",
                                           str(hello_bundle(v)))
            assert code == 0, err
        code, out, err = await fleetwave(*fleet.client_args(), "deploy", "hello", "1.0.0",
                                         "--batch", "100%", "--max-unavailable", "100%",
                                         timeout=DEPLOY_TIMEOUT)
        assert code == 0, out + err
        yield fleet


def _access(fleet: DevFleet, role: str, name: str) -> dict[str, Any]:
    assert fleet.auth_dir is not None
    return {"creds": creds_file.load(AuthDir(fleet.auth_dir).creds_path(role, name)),
            "tls_ca": str(fleet.auth_dir / CA)}


async def _state(bus: Bus) -> tuple[list[Entry], dict[str, int], list[str]]:
    """What must not change: the desired states, the generation each node converged on (its
    observed state's other figures move on their own), and which rollouts exist."""
    observed = {e.key: decode(ObservedState, e.value or b"").observed_generation
                for e in await bus.kv_entries(OBSERVED)}
    return (await desired_states(bus, F), observed,
            sorted(e.key for e in await bus.kv_entries(subjects.rollouts_bucket(F))))


async def _server_log(fleet: DevFleet) -> str:
    """Every broker's log: a client's refused requests are logged by the one it is on."""
    return "".join([await read_text(b.store_dir / "nats-server.log") for b in fleet.brokers])


def _violations(log: str) -> set[str]:
    """The subjects the server refused, from its "Publish/Subscription Violation" lines."""
    out = set()
    for line in log.splitlines():
        if "Violation" in line and 'Subject "' in line:
            out.add(line.split('Subject "', 1)[1].split('"', 1)[0])
    return out


async def _unanswered(bus: Bus, subject: str, body: bytes = b"{}") -> None:
    """A request the server must drop: no answer at all (its log says why)."""
    with pytest.raises((BusError, TimeoutError)):
        async with asyncio.timeout(REFUSED_WAIT + 1):
            await bus.request(subject, body, timeout=REFUSED_WAIT)


# -- the matrix -----------------------------------------------------------------------------------


async def _jetstream_abuse(fleet: DevFleet, node1: Bus, coord: Bus) -> set[str]:
    """node-1 against the JetStream API; returns the subjects the server must have refused."""
    infos = await coord.js.consumers_info(KV_DESIRED)
    victim = await _victim(coord)
    node2_key = f"$KV.{DESIRED}.node-2.hello"
    consumer = json.dumps({"stream_name": KV_DESIRED, "config": {
        "filter_subject": f"$KV.{DESIRED}.node-2.*", "deliver_subject": "_FWN.node-1.spy",
        "deliver_policy": "last_per_subject", "ack_policy": "none"}}).encode()
    dropped: dict[str, bytes] = {
        # The key names: every node id and service (stream info with a subjects filter).
        f"$JS.API.STREAM.INFO.{KV_DESIRED}":
            json.dumps({"subjects_filter": f"$KV.{DESIRED}.>"}).encode(),
        f"$JS.API.STREAM.INFO.KV_{OBSERVED}": b"{}",
        f"$JS.API.STREAM.INFO.KV_{subjects.nodes_bucket(F)}": b"{}",
        "$JS.API.STREAM.NAMES": b"{}",
        "$JS.API.STREAM.LIST": b"{}",
        # node-2's desired state by body: direct get, message get by key and by sequence.
        f"$JS.API.DIRECT.GET.{KV_DESIRED}": json.dumps({"last_by_subj": node2_key}).encode(),
        f"$JS.API.DIRECT.GET.{KV_DESIRED}.{node2_key}": b"",
        f"$JS.API.STREAM.MSG.GET.{KV_DESIRED}": json.dumps({"seq": 1}).encode(),
        # A consumer whose filter is in the body only, and listing or touching node-2's.
        f"$JS.API.CONSUMER.CREATE.{KV_DESIRED}": consumer,
        f"$JS.API.CONSUMER.NAMES.{KV_DESIRED}": b"{}",
        f"$JS.API.CONSUMER.LIST.{KV_DESIRED}": b"{}",
        f"$JS.API.CONSUMER.INFO.{KV_DESIRED}.{victim}": b"",
        f"$JS.API.CONSUMER.DELETE.{KV_DESIRED}.{victim}": b"",
        f"$JS.API.CONSUMER.CREATE.{KV_DESIRED}.{victim}.{node2_key}": consumer,
        # Streams: create, update, purge, delete, delete one message; the events stream too.
        "$JS.API.STREAM.CREATE.SPY": json.dumps({"name": "SPY", "subjects": [">"]}).encode(),
        f"$JS.API.STREAM.UPDATE.{KV_DESIRED}": b"{}",
        f"$JS.API.STREAM.PURGE.{subjects.events_stream(F)}": b"{}",
        f"$JS.API.STREAM.DELETE.{subjects.object_stream(RELEASES)}": b"",
        f"$JS.API.STREAM.MSG.DELETE.{KV_DESIRED}": json.dumps({"seq": 1}).encode(),
        f"$JS.API.STREAM.PURGE.{subjects.object_stream(RELEASES)}": b"{}",
        # The account's other JetStream corners.
        "$JS.API.INFO": b"",
        "$JS.API.ACCOUNT.PURGE": b"",
        "$JS.API.META.LEADER.STEPDOWN": b"",
    }
    spied: list[str] = []

    async def spy(subject: str, _: bytes) -> None:
        spied.append(subject)
    await node1.subscribe("_FWN.node-1.spy", spy)
    # Allowed by subject (its own filter there), but the body asks for node-2's keys, or
    # several filters: the server refuses a body that disagrees with the subject.
    own = f"$JS.API.CONSUMER.CREATE.{KV_DESIRED}.spy1.$KV.{DESIRED}.node-1.*"
    for config in ({"filter_subject": f"$KV.{DESIRED}.node-2.*"},
                   {"filter_subjects": [f"$KV.{DESIRED}.node-1.*", f"$KV.{DESIRED}.node-2.*"]},
                   {"filter_subject": f"$KV.{DESIRED}.>"}):
        body = {"stream_name": KV_DESIRED, "config": {
            "name": "spy1", "deliver_subject": "_FWN.node-1.spy", "ack_policy": "none",
            "deliver_policy": "last_per_subject", **config}}
        reply = json.loads(await node1.request(own, json.dumps(body).encode(), timeout=5))
        assert "error" in reply, (config, reply)
    # node-2's consumer by name, through the subject node-1 may use (its own filter): an
    # update would re-point node-2's watch at node-1's keys and inbox.
    # (The server refuses: "consumer name already in use"; it never re-points one.)
    [victim_config] = [c.config for c in infos if c.name == victim]
    hijack = {**victim_config.as_dict(), "filter_subject": f"$KV.{DESIRED}.node-1.*",
              "deliver_subject": "_FWN.node-1.spy"}
    for variant in ({}, {"action": "update"}, {"config": {**hijack, "durable_name": victim}}):
        body = {"stream_name": KV_DESIRED, "config": hijack, **variant}
        reply = json.loads(await node1.request(
            f"$JS.API.CONSUMER.CREATE.{KV_DESIRED}.{victim}.$KV.{DESIRED}.node-1.*",
            json.dumps(body).encode(), timeout=5))
        assert "error" in reply, (variant, reply)
    await asyncio.gather(*(_unanswered(node1, s, b) for s, b in dropped.items()))
    await node1.flush()
    assert not any("node-2" in s for s in spied) and spied == [], spied
    # node-2's watch consumer is still there, still on node-2's keys.
    after = {c.name: c.config.filter_subject for c in await coord.js.consumers_info(KV_DESIRED)}
    assert after.get(victim) == f"$KV.{DESIRED}.node-2.*", after
    return set(dropped)


async def _victim(coord: Bus) -> str:
    """node-2's live watch consumer, as an administrator sees it: the name an attacker needs."""
    infos = await coord.js.consumers_info(KV_DESIRED)
    names = [c.name for c in infos if c.config.filter_subject == f"$KV.{DESIRED}.node-2.*"]
    assert names, [c.config.filter_subject for c in infos]
    return str(names[0])


async def _operator_abuse(fleet: DevFleet, coord: Bus) -> set[str]:
    """An operator's credentials cannot list consumers (a create naming one updates it: its
    filter re-pointed), delete, pause or reset node-2's watch, restore over a stream, move a
    stream's replicas, or take the JetStream leader or a server away."""
    op = await Bus.connect(fleet.nats_url, F, **fleet.access())
    victim = await _victim(coord)
    dropped = [f"$JS.API.CONSUMER.LIST.{KV_DESIRED}", f"$JS.API.CONSUMER.NAMES.{KV_DESIRED}",
               f"$JS.API.CONSUMER.DURABLE.CREATE.{KV_DESIRED}.{victim}",
               f"$JS.API.CONSUMER.DELETE.{KV_DESIRED}.{victim}",
               f"$JS.API.CONSUMER.PAUSE.{KV_DESIRED}.{victim}",
               f"$JS.API.CONSUMER.RESET.{KV_DESIRED}.{victim}",
               f"$JS.API.STREAM.RESTORE.{KV_DESIRED}", "$JS.API.META.LEADER.STEPDOWN",
               f"$JS.API.STREAM.PEER.EVACUATE.{KV_DESIRED}",
               f"$JS.API.STREAM.CANCEL_MOVE.{KV_DESIRED}", "$JS.API.SERVER.EVACUATE"]
    try:
        await asyncio.gather(*(_unanswered(op, s) for s in dropped))
        # Nor say a release was pushed (only the leader relays what the store says).
        with contextlib.suppress(BusError):
            await op.publish(subjects.released(F), encode(_NOTICE))
        await op.flush()
    finally:
        await op.close()
    assert await _victim(coord) == victim
    return {*dropped, subjects.released(F)}


async def _endpoints(coord: Bus) -> set[str]:
    """The subjects of the endpoints the coordinator's micro service announces ($SRV.INFO; the
    write verbs: the reads are answered apart, API_VERBS names them)."""
    answers: list[bytes] = []

    async def answered(_: str, data: bytes) -> None:
        answers.append(data)
    inbox = coord.nc.new_inbox()
    sub = await coord.subscribe(inbox, answered)
    try:
        await coord.nc.publish("$SRV.INFO", b"", reply=inbox)

        async def subjects_so_far() -> set[str]:
            return {e["subject"] for a in answers for e in json.loads(a)["endpoints"]}
        return await wait_until(subjects_so_far, bool, timeout=5,
                                what="the coordinator's API service to announce itself")
    finally:
        await sub.unsubscribe()


async def _object_store_and_buckets(node1: Bus) -> set[str]:
    """Put or delete a release object; write the rollouts, locks, cordons and desired
    buckets."""
    for attempt in (node1.obj_put(RELEASES, "hello/6.6.6", b"forged"),
                    node1.kv_put(subjects.rollouts_bucket(F), "forged", b"{}"),
                    node1.kv_put(subjects.locks_bucket(F), "hello", b"{}"),
                    node1.kv_put(subjects.cordons_bucket(F), "node-1", b"{}"),
                    node1.kv_put(DESIRED, "node-1.hello", b"{}"),
                    node1.kv_put(DESIRED, "node-2.hello", b"{}"),
                    node1.kv_put(subjects.release_index_bucket(F), "hello.6=2E6=2E6", b"{}")):
        with pytest.raises((BusError, TimeoutError)):
            async with asyncio.timeout(REFUSED_WAIT + 1):
                await attempt
    # Deleting an object is a put of its metadata with a rollup header (nats-py's delete).
    meta = f"$O.{RELEASES}.M.{base64.urlsafe_b64encode(b'hello/1.0.0').decode()}"
    with pytest.raises((BusError, TimeoutError)):
        async with asyncio.timeout(REFUSED_WAIT + 1):
            await node1.js_publish(meta, b"{}")
    return {meta, f"$KV.{subjects.rollouts_bucket(F)}.forged",
            f"$KV.{subjects.locks_bucket(F)}.hello", f"$KV.{subjects.cordons_bucket(F)}.node-1",
            f"$KV.{DESIRED}.node-1.hello",
            f"$KV.{DESIRED}.node-2.hello",
            f"$KV.{subjects.release_index_bucket(F)}.hello.6=2E6=2E6"}


async def _rollups(node1: Bus, coord: Bus) -> None:
    """Its own keys of the buckets agents write, with a rollup header: stored, ``Nats-Rollup:
    all`` purges the whole stream (every node's observed state, every registration), and a
    permission sees the subject, not the header: the streams refuse rollups (a review found
    them allowed, as nats-py makes every bucket)."""
    nodes = sorted(e.key for e in await coord.kv_entries(subjects.nodes_bucket(F)))
    assert "node-2" in nodes, nodes
    for subject, body in ((f"$KV.{OBSERVED}.node-1.hello", b"{}"),
                          (f"$KV.{subjects.nodes_bucket(F)}.node-1",
                           encode(NodeInfo(id="node-1")))):
        [result] = await node1.js_publish_all([(subject, body, {"Nats-Rollup": "all"})])
        assert isinstance(result, BusError) and "rollup" in str(result).lower(), result
    assert sorted(e.key for e in await coord.kv_entries(subjects.nodes_bucket(F))) == nodes


async def _api_and_events(fleet: DevFleet, node1: Bus, coord: Bus) -> set[str]:
    """Every API verb, for every caller, on the shared subjects and on the leader's own; forged
    events."""
    asked = subjects.api(F, subjects.COORDINATOR_CALLER, "leader")
    leader = json.loads(await coord.request(asked, b"{}"))["data"]["holder"]
    verbs = sorted({*API_VERBS, *(s.rsplit(".", 1)[1] for s in await _endpoints(coord))})
    # As itself, as the operator, as the coordinator, and on an older CLI's subjects.
    callers = ("node-1", "admin", subjects.COORDINATOR_CALLER)
    dropped = [subjects.api(F, c, v) for c in callers for v in verbs]
    dropped += [subjects.legacy_api(F, v) for v in verbs]
    dropped += [subjects.coordinator_api(F, leader, c, v)
                for c in callers for v in subjects.WRITE_VERBS]
    dropped += [subjects.legacy_coordinator_api(F, leader, v) for v in subjects.WRITE_VERBS]
    dropped.append(subjects.coordinator_ping(F, leader))
    dropped += ["$SRV.PING", "$SRV.INFO"]
    await asyncio.gather(*(_unanswered(node1, s, b'{"id": "x", "service": "hello"}')
                           for s in dropped))
    # Events: node-2's subject, the coordinator's, the old shared one; and one on node-1's own
    # subject that names node-2 (the server lets it through: readers refuse it).
    forged = Event(id="forged-1", time=1.0, fleet=F, kind="slot.failed", node="node-2",
                   service="hello", message="forged by node-1")
    published = [subjects.agent_event(F, "node-2", "slot.failed"),
                 subjects.event(F, "rollout.succeeded"), subjects.event(F, "slot.failed")]
    for subject in published:
        with contextlib.suppress(BusError):
            await node1.publish(subject, encode(forged))
    # The heartbeat pace and the word of releases pushed are the leader's alone: a node may
    # hear them, not say them.
    published.append(subjects.pace(F))
    with contextlib.suppress(BusError):
        await node1.publish(subjects.pace(F), encode(Pace(interval=300.0)))
    published.append(subjects.released(F))
    with contextlib.suppress(BusError):
        await node1.publish(subjects.released(F), encode(_NOTICE))
    await node1.publish(subjects.agent_event(F, "node-1", "slot.failed"), encode(forged))
    await node1.flush()
    code, out, err = await wait_until(
        lambda: fleetwave(*fleet.client_args(), "events", "-o", "json"),
        lambda r: "names node 'node-2'" in r[2], timeout=10,
        what="fleetwave events to see the forgery")
    assert code == 0 and "forged by node-1" not in out, out
    assert "on node 'node-1''s subject names node 'node-2'" in err, err
    return {*dropped, *published}


async def _replays(fleet: DevFleet, coord: Bus) -> None:
    """A captured desired state of a lower generation, and one signed under an older leader
    term, written back into node-1's key: only a writer of the desired bucket can try it (the
    coordinator's credentials; a node's or an operator's cannot write there, test_auth.py).
    node-1's agent refuses both with an agent.refused event and keeps serving 2.0.0."""
    key = subjects.node_service_key("node-1", "hello")
    old = await coord.kv_get(DESIRED, key)
    assert old is not None
    code, out, err = await fleetwave(*fleet.client_args(), "deploy", "hello", "2.0.0",
                                     "--batch", "100%", "--max-unavailable", "100%",
                                     timeout=DEPLOY_TIMEOUT)
    assert code == 0, out + err
    await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"2.0.0"},
                     timeout=30, what="every node serving 2.0.0")

    async def final() -> SignedEnvelope:
        now = await coord.kv_get(DESIRED, key)
        assert now is not None
        return decode(SignedEnvelope, now.value or b"")

    # The rollout's last write to node-1, its old slot retired, lands after the deploy returns
    # (the record says succeeded first): a replay built on the one before it was refused as
    # "not newer" instead of for its term (CI at 425f580).
    env = await wait_until(final, lambda e: [r.version for r in decode(
        DesiredState, e.payload).slots.values()] == ["2.0.0"], timeout=30,
        what="node-1's last desired state of the rollout (the old slot retired)")
    assert env.term >= 1
    converged = await wait_until(lambda: _converged(coord, key), lambda g: g == env.generation,
                                 timeout=30, what="node-1 to converge on 2.0.0's generation")
    # Older term: a genuine signature, the next generation, the term before the current one.
    desired = decode(DesiredState, env.payload)
    desired.generation += 1
    stale_term = sign(load_seed(fleet.key_file), desired, term=env.term - 1)
    for value in (old.value or b"", encode(stale_term)):
        await coord.kv_put(DESIRED, key, value)
    events = await wait_until(
        lambda: _refusals(coord), lambda r: len(r) >= 2, timeout=15,
        what="node-1's agent to refuse both replays")
    reasons = " | ".join(e.message for e in events)
    assert "not newer than" in reasons and "lease term" in reasons, reasons
    assert await serving(fleet) == {"node-1": "2.0.0", "node-2": "2.0.0"}
    assert await _converged(coord, key) == converged
    log = await read_text(fleet.dir / "logs" / "node-1.log")
    assert log.count("refused desired state for hello") >= 2 and "Traceback" not in log


async def _converged(bus: Bus, key: str) -> int:
    """The generation node-1 reports having converged on (0 while it has not on the newest)."""
    entry = await bus.kv_get(OBSERVED, key)
    assert entry is not None and entry.value is not None
    seen = decode(ObservedState, entry.value)
    return seen.observed_generation if seen.generation == seen.observed_generation else 0


async def _refusals(bus: Bus) -> list[Event]:
    return [decode(Event, d) async for d in bus.stream_messages(
        subjects.events_stream(F), subjects.agent_events(F, "node-1", "agent.refused"))]


async def _matrix(fleet: DevFleet) -> None:
    node1 = await Bus.connect(fleet.nats_url, F, **_access(fleet, "node", "node-1"))
    coord = await Bus.connect(fleet.nats_url, F, **_access(fleet, "coordinator", "coordinator"))
    try:
        several = os.urandom(300_000)  # three chunks of the object store: batches of direct gets
        await coord.obj_put(RELEASES, "hello/0.0.1", several)
        before = await _state(coord)
        # Its own keys work: the permissions are not simply closed.
        assert [e.key for e in await node1.kv_entries(DESIRED, "node-1.*")] == ["node-1.hello"]
        # And a release of several chunks comes whole: the batches' answers (many messages to
        # one request) pass the accounts' export, where one message alone would have.
        got = bytearray()
        assert await node1.obj_get_into(RELEASES, "hello/0.0.1", got.extend)
        assert bytes(got) == several
        refused = await _jetstream_abuse(fleet, node1, coord)
        refused |= await _object_store_and_buckets(node1)
        refused |= await _api_and_events(fleet, node1, coord)
        refused |= await _operator_abuse(fleet, coord)
        await _rollups(node1, coord)
        assert node1.connected
        assert await _state(coord) == before
        log = await _server_log(fleet)
        assert not refused - _violations(log), sorted(refused - _violations(log))
        # ... and every agent may hear it (their subscriptions were not refused).
        refused_subs = {line.split('Subject "', 1)[1].split('"', 1)[0]
                        for line in log.splitlines() if "Subscription Violation" in line}
        assert not refused_subs & {subjects.pace(F), subjects.released(F)}, log[-3000:]
        assert "$O." in " ".join(_violations(log))  # the object put and delete
        await _replays(fleet, coord)
    finally:
        await node1.close()
        await coord.close()


async def test_node_credentials_abuse_nothing_on_a_secure_dev_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With node-1's credentials on `dev up --secure`: the JetStream API (key listing by stream
    info, gets and consumers by body, node-2's watch consumer, streams), every API verb, the
    object store, the coordinator's buckets, node-2's and the coordinator's events are all
    refused and logged, as are an operator's deletion or pause of node-2's watch; a forged
    event on its own subject is refused by readers; replays are refused by the agent; the fleet
    is unchanged."""
    async with secure_fleet(tmp_path, monkeypatch, shipped=False) as fleet:
        await _matrix(fleet)


async def test_the_shipped_auth_conf_holds_the_same_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy/nats/auth.conf as shipped (TLS, the users `fleetwave auth` generates), with only
    addresses and paths changed: a rollout works over it and the same matrix holds."""
    async with secure_fleet(tmp_path, monkeypatch, shipped=True) as fleet:
        conf = await read_text(fleet.dir / "jetstream" / "nats-server.conf")
        assert "generated by fleetwave" not in conf and "tls {" in conf
        assert "TLS required for client connections" in await _server_log(fleet)
        await _matrix(fleet)


async def _outsider_routes(fleet: DevFleet, other: Path) -> None:
    """A plain route, a TLS route without a certificate and one with another fleet's server
    certificate (``other``'s) are each closed by every broker before it says anything (routes
    start with TLS); its log names why, and the cluster's routes are unchanged."""
    assert fleet.auth_dir is not None
    AuthDir(other).init(F, (), "admin")

    def tls(cert: Path | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(fleet.auth_dir / CA))
        if cert is not None:
            ctx.load_cert_chain(str(cert / SERVER), str(cert / SERVER_KEY))
        return ctx

    before = [await asyncio.to_thread(_routes, b.monitor_port) for b in fleet.brokers]
    assert all(len(r) >= 2 for r in before), before
    for b in fleet.brokers:
        assert b.cluster is not None
        host, port = b.cluster.listen_host, b.cluster.listen_port
        for name, ctx in (("plain", None), ("no certificate", tls(None)),
                          ("another fleet's", tls(other))):
            got = await _route_attempt(host, port, ctx)
            assert got == b"", (b.server_name, name, got)
        log = await read_text(b.store_dir / "nats-server.log")
        for why in ("first record does not look like a TLS handshake",  # plain
                    "client didn't provide a certificate",  # TLS, no certificate
                    "certificate signed by unknown authority"):  # another fleet's certificate
            assert why in log, (b.server_name, why)
    assert [await asyncio.to_thread(_routes, b.monitor_port) for b in fleet.brokers] == before


async def test_the_shipped_cluster_confs_hold_the_same_matrix_and_refuse_outsider_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy/nats/cluster-{1,2,3}.conf as shipped (client TLS, the generated users, routes
    over mutual TLS with the fleet's certificates), with only addresses, paths and routes
    changed: three servers form a cluster over those routes, a rollout works over it, a route
    without a certificate the fleet's CA signed is refused by each server, and the same
    matrix holds with node-1 on whichever server it reaches."""
    async with secure_fleet(tmp_path, monkeypatch, shipped=True, brokers=3) as fleet:
        for b in fleet.brokers:
            conf = await read_text(b.store_dir / "nats-server.conf")
            assert "generated by fleetwave" not in conf and "verify: true" in conf
        await _outsider_routes(fleet, tmp_path / "other")
        await _matrix(fleet)
