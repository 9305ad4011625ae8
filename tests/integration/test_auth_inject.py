"""A node cannot depose the coordinator through the server. nats-server sends the answer to a
request wherever its reply subject says, checked against no permission: node-1's credentials
may ask for the releases stream's info, and the answer, sent to the lease key or a bucket's
fence key, is stored there by that bucket's stream. Before, one such request made the
coordinator stop leading (term 1 to 2), and a stream of them failed a deploy ("lost the
lead"). Now a value no coordinator writes is written back over while the lease says this
coordinator leads (``coordinator.runtime.lease``): under a stream of such requests onto the
lease, then onto the fences, rollouts succeed and the term stays. Real nats-server with the
permissions ``fleetwave auth`` writes, real agents over TLS.

This is the broker of an auth directory not migrated to accounts (``unmigrated_auth``): one
account for the whole fleet, as every release before session 23 made it. In the fleet's own
accounts no such answer reaches the fleet's streams at all (``test_auth_accounts.py``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from coordinator.auth.enroll import CA, AuthDir
from coordinator.dev.devfleet import DevFleet
from protocol import creds as creds_file
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.messages import DesiredState, LeaseRecord, SignedEnvelope
from tests.integration.e2e_support import DEPLOY_TIMEOUT, serving
from tests.integration.procs import (
    fleetwave,
    hello_bundle,
    read_text,
    unmigrated_auth,
    wait_until,
)

SUBNET = "127.0.75"
F = "default"
EVERY = 0.02  # seconds between a forged answer onto each key


async def _term(op: Bus) -> int | None:
    """The lease's term; None while it holds a forged answer (until the next renewal)."""
    entry = await op.kv_get(subjects.lease_bucket(F), subjects.LEASE_KEY)
    assert entry is not None and entry.value is not None
    try:
        return decode(LeaseRecord, entry.value).term
    except ProtocolError:
        return None


@contextlib.asynccontextmanager
async def installed(tmp_path: Path) -> AsyncIterator[tuple[DevFleet, Bus, Bus]]:
    """A secure dev fleet of 2 agents with 1.0.0 and 2.0.0 pushed and 1.0.0 installed, and
    two clients of it: its operator's, and one with node-1's credentials."""
    unmigrated_auth(tmp_path / "fleet")
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        assert fleet.auth_dir is not None
        for v in ("1.0.0", "2.0.0"):
            code, _, err = await fleetwave(*fleet.client_args(), "release", "push",
                                           str(hello_bundle(v)))
            assert code == 0, err
        code, out, err = await fleetwave(*fleet.client_args(), "deploy", "hello", "1.0.0",
                                         "--batch", "100%", "--max-unavailable", "100%",
                                         timeout=DEPLOY_TIMEOUT)
        assert code == 0, out + err
        op = await Bus.connect(fleet.nats_url, F, **fleet.access())
        node1 = await Bus.connect(
            fleet.nats_url, F, tls_ca=str(fleet.auth_dir / CA),
            creds=creds_file.load(AuthDir(fleet.auth_dir).creds_path("node", "node-1")))
        try:
            yield fleet, op, node1
        finally:
            await node1.close()
            await op.close()


async def test_a_nodes_forged_answers_on_the_lease_and_fences_depose_no_one(
        tmp_path: Path) -> None:
    async with installed(tmp_path) as (fleet, op, node1):
        ask = f"$JS.API.STREAM.INFO.{subjects.object_stream(subjects.releases_store(F))}"
        lease = [f"$KV.{subjects.lease_bucket(F)}.{subjects.LEASE_KEY}"]
        fences = [f"$KV.{b}.{subjects.FENCE_KEY}" for b in subjects.fenced_buckets(F)]
        sent = 0

        async def inject(targets: list[str]) -> None:
            nonlocal sent
            while True:
                for target in targets:
                    await node1.nc.publish(ask, b"", reply=target)
                    sent += 1
                await node1.nc.flush()
                await asyncio.sleep(EVERY)

        async def deploy_under(targets: list[str], version: str) -> None:
            injecting = asyncio.ensure_future(inject(targets))
            try:
                code, out, err = await fleetwave(
                    *fleet.client_args(), "deploy", "hello", version, "--batch", "1",
                    "--bake", "0", timeout=DEPLOY_TIMEOUT)
            finally:
                injecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await injecting
            assert code == 0, out + err
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {version},
                             timeout=30, what=f"every node serving {version}")

        before = await _term(op)
        # A stream onto the lease (the fences untouched), then, once its last forged value
        # is renewed over, one onto every fence (the lease readable: it says who leads).
        # Both at once can stall writes, safely (Fenced._refence cannot tell then who
        # leads, and a forged value left on a fence waits for a readable lease): the unit
        # tests show it.
        await deploy_under(lease, "2.0.0")
        await wait_until(lambda: _term(op), lambda t: t is not None, timeout=5,
                         what="the lease readable again")
        await deploy_under(fences, "1.0.0")
        assert sent > 20
        log = await read_text(fleet.dir / "logs" / "coordinator.log")
        # the forged answers reached the keys (the server stored them), and were put back
        assert "which no coordinator writes" in log, log[-2000:]
        assert "stopped leading" not in log, log[-2000:]
        # the last forged answer stays until the leader's next renewal puts the lease back
        assert await wait_until(lambda: _term(op), lambda t: t is not None, timeout=5,
                                what="the lease readable again") == before


async def test_a_nodes_forged_answer_in_another_nodes_desired_key_blocks_no_deploy(
        tmp_path: Path) -> None:
    """node-1 has the server write its request's answer into node-2's desired key. node-2's
    agent refuses it (not signed) and keeps serving; the coordinator started after it writes
    over it (the last writes of the rollout before, made again at its start) or, reading it,
    plans node-2 from the key's last signed state (``RolloutStore.current_desired``: its unit
    test shows that path alone), and the deploy succeeds everywhere. (More such answers than
    the bucket keeps revisions of a key, 5, while no coordinator writes over them, still stop
    a deploy: what ends that is an account of the streams' own; README, Security.)"""
    async with installed(tmp_path) as (fleet, op, node1):
        # The install's last writes done (its lock goes last), then a coordinator that has
        # read nothing yet: a new one (a leader knows what it wrote, and reads no bucket).
        await wait_until(lambda: op.kv_get(subjects.locks_bucket(F), "hello"),
                         lambda e: e is None, timeout=30, what="the install's lock released")

        async def leaderships() -> int:  # the log is kept across the restart
            return (await read_text(fleet.coordinator.log_path)).count("leads fleet")

        led = await leaderships()
        await fleet.coordinator.kill()
        # Forged while no coordinator runs: the next one reads it first thing.
        key = f"$KV.{subjects.desired_bucket(F)}.node-2.hello"
        ask = f"$JS.API.STREAM.INFO.{subjects.object_stream(subjects.releases_store(F))}"
        await node1.nc.publish(ask, b"", reply=key)
        await node1.nc.flush()
        await wait_until(
            lambda: op.kv_get(subjects.desired_bucket(F), "node-2.hello"),
            lambda e: e is not None and e.value is not None and b"stream_info" in e.value,
            timeout=5, what="the server's answer in node-2's desired key")
        await fleet.coordinator.start()
        await wait_until(leaderships, lambda n: n > led, timeout=30,
                         what="the restarted coordinator leading")
        code, out, err = await fleetwave(*fleet.client_args(), "deploy", "hello", "2.0.0",
                                         "--batch", "1", "--bake", "0",
                                         timeout=DEPLOY_TIMEOUT)
        assert code == 0, out + err
        await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"2.0.0"},
                         timeout=30, what="every node serving 2.0.0")
        # The stray value is gone: written over by the coordinator that came after it, up to
        # the old slot's retirement (written just after the deploy returns: waited for; read at
        # once, it was still the switch's two slots, once in CI).
        async def versions() -> set[str]:
            entry = await op.kv_get(subjects.desired_bucket(F), "node-2.hello")
            assert entry is not None and entry.value is not None
            state = decode(DesiredState, decode(SignedEnvelope, entry.value).payload)
            return {r.version for r in state.slots.values()}

        await wait_until(versions, lambda v: v == {"2.0.0"}, timeout=30,
                         what="node-2's desired state to name 2.0.0 alone")


async def test_the_coordinator_answers_no_request_whose_reply_subject_is_no_inbox(
        tmp_path: Path) -> None:
    """The coordinator would publish its answer with its own rights: an operator asking with a
    bucket's key as the reply subject would have it write that key. It answers only inboxes
    (``_...``): such a request gets no answer and a line; the key is not written, and the
    same request with an inbox is answered."""
    unmigrated_auth(tmp_path / "fleet")
    async with DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        op = await Bus.connect(fleet.nats_url, F, **fleet.access())
        try:
            lease = subjects.lease_bucket(F)
            asked = subjects.api(F, fleet.caller, "nodes")
            await op.nc.publish(asked, b"{}", reply=f"$KV.{lease}.written")
            await op.nc.flush()
            log = fleet.coordinator.log_path

            async def said() -> str:
                return await read_text(log)

            await wait_until(said, lambda text: "not answering" in text, timeout=10,
                             what="the coordinator saying it did not answer")
            assert await op.kv_get(lease, "written") is None
            answer = await op.request(asked, b"{}", timeout=5)  # with an inbox: answered
            assert b'"ok":true' in answer.replace(b" ", b""), answer[:200]
        finally:
            await op.close()
