"""Answers larger than one NATS message (``protocol.chunks``): on a server taking 1 MB (its
default), the node table and a rollout's status of 8,000 simulated nodes (each over 1 MB) reach the
``fleetwave`` CLI whole, a followed deploy runs to its end, and with a standby coordinator
answering every read too (two answers interleaved on one inbox) the first is taken whole; the
standby's dashboard pushes a page of each table (``PAGE_NODES`` rows) with counts of all. On a
secure server, the permissions ``fleetwave auth`` writes let the coordinator's identity answer
an operator in many messages. Before, each of these waited for a timeout: the coordinator's
answer was refused by the client library for its size. Real nats-server, coordinators and agent
(``--simulate``) on 127.0.73.x."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.auth.enroll import CA, COORDINATOR, AuthDir
from coordinator.dev.broker import Broker, free_port
from coordinator.dev.cluster import monitor_get
from coordinator.web.handlers import PAGE_NODES
from protocol import chunks
from protocol import creds as creds_file
from protocol.bus import Bus
from protocol.codec import encode
from protocol.errors import NoResponders
from tests.integration.procs import fleetwave, reaping, wait_until
from tests.integration.test_dashboard_api import _first_snapshot
from tests.integration.test_dashboard_browser import call
from tests.integration.test_record_split import coordinator, simulated

N = 8000
SUBNET = "127.0.73"
HTTP_HOST = f"{SUBNET}.2"  # the standby's dashboard
FLEET = "default"
MAX_PAYLOAD = "1MB"  # the server's own default


async def node_rows(url: str) -> list[dict[str, object]]:
    code, out, err = await fleetwave("nodes", "-o", "json", nats_url=url)
    assert code == 0, (code, err)
    rows: list[dict[str, object]] = json.loads(out)
    return rows


async def test_answers_beyond_one_message_reach_the_cli_whole(tmp_path: Path) -> None:
    async with simulated(tmp_path, N, MAX_PAYLOAD, SUBNET) as (broker, bus, _coord, _sim, key):
        assert bus.max_payload == 1 << 20
        rows = await node_rows(broker.url)
        assert len(rows) == N and len({r["id"] for r in rows}) == N
        assert len(encode(rows)) > 1 << 20  # it took more than one message

        # A followed deploy (the CLI polls status, whose node rows pass 1 MB) to its end.
        code, out, err = await fleetwave(
            "deploy", "hello", "1.0.0", "--batch", "25%", "--max-unavailable", "25%",
            nats_url=broker.url, timeout=120)
        assert code == 0, (code, out, err)
        code, out, err = await fleetwave("status", "-o", "json", nats_url=broker.url)
        assert code == 0, (code, err)
        status = json.loads(out)
        assert status["state"] == "succeeded" and len(status["nodes"]) == N
        assert len(out) > 1 << 20

        # A standby answers every read too: two answers in chunks on one inbox, the first
        # taken whole each time. Its dashboard's snapshot holds a page of each table.
        port = free_port(HTTP_HOST)
        async with reaping(coordinator(broker.url, tmp_path, key, "standby",
                                       "--http", f"{HTTP_HOST}:{port}")):
            for _ in range(6):
                rows = await node_rows(broker.url)
                assert len(rows) == N and len({r["id"] for r in rows}) == N
            await wait_until(lambda: call(f"http://{HTTP_HOST}:{port}/readyz"),
                             lambda r: r[0] == 200, timeout=30, what="the standby's dashboard")
            snap = await asyncio.to_thread(_first_snapshot, f"http://{HTTP_HOST}:{port}/api/stream")
        assert len(snap["nodes"]) == PAGE_NODES
        # Just started, it may not have heard every node yet (paced every 4 s): none offline.
        assert snap["node_count"] == snap["nodes_online"] + snap["nodes_unheard"] == N
        assert snap["rollout"]["id"] == status["id"] and snap["rollout"]["node_count"] == N
        assert len(snap["rollout"]["nodes"]) == PAGE_NODES
        assert snap["rollout"]["node_states"] == {"done": N}


@pytest.fixture
async def secure_broker(tmp_path: Path) -> AsyncIterator[tuple[Broker, AuthDir]]:
    auth = AuthDir(tmp_path / "auth")
    await asyncio.to_thread(auth.init, FLEET, (), "ops")
    broker = Broker(store_dir=tmp_path / "js", auth=auth.path, max_payload="64KB")
    await broker.start()
    try:
        yield broker, auth
    finally:
        await broker.stop()


async def test_the_coordinators_permissions_carry_an_answer_in_many_messages(
        secure_broker: tuple[Broker, AuthDir]) -> None:
    """As ``fleetwave auth`` writes them: the coordinator's identity answers an operator's
    request on the operator's own inbox in ``MAX_CHUNKS`` messages (with one allowed
    response, as before, the second was refused and the answer cut short)."""
    broker, auth = secure_broker
    tls = str(auth.path / CA)
    coord = await Bus.connect(broker.url, FLEET, name="test-coordinator", tls_ca=tls,
                              creds=creds_file.load(auth.creds_path("coordinator", COORDINATOR)))
    ops = await Bus.connect(broker.url, FLEET, name="test-operator", tls_ca=tls,
                            creds=creds_file.load(auth.creds_path("operator", "ops")))
    try:
        most = chunks.limit(coord.max_payload)
        answer = bytes(range(256)) * (most * chunks.MAX_CHUNKS // 256)
        assert len(list(chunks.split(answer, most))) == chunks.MAX_CHUNKS

        async def handler(_subject: str, data: bytes) -> bytes:
            return answer if data == b"all" else data

        subject = f"fw.{FLEET}.api.ops.nodes"
        await coord.respond(subject, handler)
        await coord.flush()

        async def small() -> bytes | None:
            try:
                return await ops.request(subject, b"small", timeout=5)
            except NoResponders:  # (once, in a loaded CI run, just after the subscription)
                return None

        await wait_until(small, lambda got: got == b"small", timeout=15,
                         what="the coordinator's identity answering the operator")
        assert await ops.request(subject, b"all", timeout=10) == answer
    finally:
        await ops.close()
        await coord.close()


async def test_an_answer_under_way_when_the_server_reloads_its_users_still_reaches_the_operator(
        secure_broker: tuple[Broker, AuthDir]) -> None:
    """Every identity added, renewed or revoked reloads the server's users (``fleetwave auth``,
    the broker's watch of ``users.conf``), and a reload forgets every answer the server had
    allowed a client to send (``allow_responses`` is kept per request it delivered): an
    operator's request the coordinator was answering then was refused ("Publish Violation" on
    its ``_R_.`` reply) and the operator waited for nothing. Seen in CI as a deploy's status
    read crossing ``auth add-node``. The coordinator may answer on any reply of its account."""
    broker, auth = secure_broker
    tls = str(auth.path / CA)
    coord = await Bus.connect(broker.url, FLEET, name="test-coordinator", tls_ca=tls,
                              creds=creds_file.load(auth.creds_path("coordinator", COORDINATOR)))
    ops = await Bus.connect(broker.url, FLEET, name="test-operator", tls_ca=tls,
                            creds=creds_file.load(auth.creds_path("operator", "ops")))
    asked, answer = asyncio.Event(), asyncio.Event()

    async def handler(_subject: str, data: bytes) -> bytes:
        asked.set()
        await answer.wait()
        return data

    def loaded() -> str:
        return str(monitor_get(broker.monitor_port, "/varz")["config_load_time"])

    try:
        subject = f"fw.{FLEET}.api.ops.status"
        await coord.respond(subject, handler)
        await coord.flush()
        request = asyncio.ensure_future(ops.request(subject, b"under way", timeout=10))
        try:
            await asyncio.wait_for(asked.wait(), 15)
            before = await asyncio.to_thread(loaded)
            await asyncio.to_thread(auth.add, "node", "node-9")  # users.conf changes: a reload
            await wait_until(lambda: asyncio.to_thread(loaded), lambda t: t != before,
                             timeout=15, what="the server reloading its users")
            answer.set()
            assert await request == b"under way"
        finally:
            request.cancel()
    finally:
        await ops.close()
        await coord.close()
