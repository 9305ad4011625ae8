"""A secure fleet (``fleetwave auth`` + ``dev up --secure``) with a real nats-server: the demo
path works over TLS with per-process credentials, and node-1's credentials reach nothing of
node-2's, of the coordinator's or of the API (the first attack matrix)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import pytest

from coordinator.auth.enroll import CA, AuthDir
from coordinator.dev.devfleet import Child, DevFleet, python_module
from protocol import creds as creds_file
from protocol import subjects
from protocol.bus import Bus
from protocol.errors import AccessDenied, BusError
from tests.integration.e2e_support import DEPLOY_TIMEOUT, serving
from tests.integration.procs import (
    desired_states,
    fleetwave,
    hello_bundle,
    read_text,
    reaping,
    wait_until,
)

SUBNET = "127.0.41"
F = "default"


async def _deploy(fleet: DevFleet, version: str, *flags: str) -> None:
    code, out, err = await fleetwave(*fleet.client_args(), "deploy", "hello", version, *flags,
                                     timeout=DEPLOY_TIMEOUT)
    assert code == 0, f"deploy {version} failed ({code}): {out}{err}"


async def _push(fleet: DevFleet, *versions: str) -> None:
    for v in versions:
        code, _, err = await fleetwave(*fleet.client_args(), "release", "push",
                                       str(hello_bundle(v)))
        assert code == 0, f"release push {v} failed ({code}): {err}"


def _node_bus_args(fleet: DevFleet, node: str) -> dict[str, object]:
    assert fleet.auth_dir is not None
    return {"creds": creds_file.load(AuthDir(fleet.auth_dir).creds_path("node", node)),
            "tls_ca": str(fleet.auth_dir / CA)}


async def test_a_secure_dev_fleet_rolls_out_over_tls(tmp_path: Path) -> None:
    """dev up --secure: every process on its own credentials over TLS; a release push, an
    install and a rolling rollout succeed through the operator's CLI, and the server refused
    nothing any of them needed."""
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        await _push(fleet, "1.0.0", "2.0.0")
        await _deploy(fleet, "1.0.0", "--batch", "100%", "--max-unavailable", "100%")
        await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"1.0.0"},
                         timeout=30, what="every node serving 1.0.0")
        # Enrolling a new host as the README says: add-node, then an agent given only that
        # file (its node id is the name in it), the CA and the broker's URL.
        assert fleet.auth_dir is not None and fleet.public_key is not None
        code, out, err = await fleetwave("auth", "add-node", str(fleet.auth_dir), "node-3")
        assert code == 0, f"add-node failed ({code}): {out}{err}"
        agent = Child("node-3", python_module(
            "agent.main", "--creds", str(fleet.auth_dir / "nodes" / "node-3.creds"),
            "--tls-ca", str(fleet.auth_dir / CA), "--nats", fleet.nats_url,
            # under the fleet's dir: its teardown stops the router and service this agent
            # starts (they outlive their agent by design)
            "--data-dir", str(fleet.dir / "node-3"), "--bind-host", f"{SUBNET}.3",
            "--heartbeat-interval", "0.5", "--trust-key", fleet.public_key),
            tmp_path / "node-3.log")
        async with reaping(agent):
            await wait_until(lambda: _nodes(fleet), lambda r: bool(r.get("node-3", {}).get(
                "online")), timeout=45, what="the enrolled node-3 online")  # retries ≤ 30 s
            await _deploy(fleet, "2.0.0", "--batch", "1", "--bake", "1s")
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"2.0.0"},
                             timeout=30, what="every node serving 2.0.0")
            await wait_until(lambda: _nodes(fleet), lambda r: r["node-3"]["services"].get(
                "hello", {}).get("version") == "2.0.0", timeout=30, what="node-3 on 2.0.0")
    log = await read_text(tmp_path / "fleet" / "jetstream" / "nats-server.log")
    assert "TLS required for client connections" in log
    assert "Violation" not in log, [ln for ln in log.splitlines() if "Violation" in ln][:5]


async def test_node_credentials_reach_nothing_of_another_node(tmp_path: Path) -> None:
    """With node-1's credentials: writing node-2's observed and registration keys or the
    coordinator's buckets, purging a stream, reading node-2's desired key (get, snapshot,
    watch), subscribing _INBOX.>, fw.>, $KV.> and others' inboxes, publishing node-2's
    heartbeat and calling the API's deploy are refused by the server, as is an operator's
    direct write of a desired state; so are a connection without TLS and one with revoked
    credentials (whose holder is disconnected, no one else); the fleet's desired states,
    rollouts and node-2's observed state are unchanged."""
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        assert fleet.auth_dir is not None
        await _push(fleet, "1.0.0")
        await _deploy(fleet, "1.0.0", "--batch", "100%", "--max-unavailable", "100%")
        op = await Bus.connect(fleet.nats_url, F, **fleet.access())
        node1 = await Bus.connect(fleet.nats_url, F, **_node_bus_args(fleet, "node-1"))
        node2_creds = creds_file.load(AuthDir(fleet.auth_dir).creds_path("node", "node-2"))
        try:
            desired_before = await desired_states(op, F)
            observed_before = await op.kv_get(subjects.observed_bucket(F), "node-2.hello")
            assert desired_before and observed_before is not None
            # (the rollout's own record may still be tidied after its end: no new one may appear)
            rollouts_before = {e.key for e in await op.kv_entries(subjects.rollouts_bucket(F))}

            # Its own keys work: the permissions are not simply closed.
            own = await node1.kv_entries(subjects.desired_bucket(F), "node-1.*")
            assert [e.key for e in own] == ["node-1.hello"]

            # Write node-2's observed key.
            with pytest.raises((BusError, TimeoutError)):
                async with asyncio.timeout(3):
                    await node1.kv_put(subjects.observed_bucket(F), "node-2.hello", b"{}")
            # Write node-2's registration, and the coordinator's buckets; purge a stream.
            for bucket, key in [(subjects.nodes_bucket(F), "node-2"),
                                (subjects.desired_bucket(F), "node-1.hello"),
                                (subjects.rollouts_bucket(F), "forged"),
                                (subjects.locks_bucket(F), "hello"),
                                (subjects.cordons_bucket(F), "node-1")]:
                with pytest.raises((BusError, TimeoutError)):
                    async with asyncio.timeout(3):
                        await node1.kv_put(bucket, key, b"{}")
            with pytest.raises((BusError, TimeoutError)):
                await node1.request("$JS.API.STREAM.PURGE.KV_fw-default-desired", b"{}",
                                    timeout=2)
            # An operator may not write a desired state either (only through the API), nor
            # a cordon (``fleetwave cordon``: the coordinator records who).
            with pytest.raises((BusError, TimeoutError)):
                async with asyncio.timeout(3):
                    await op.kv_put(subjects.desired_bucket(F), "node-1.hello", b"{}")
            with pytest.raises((BusError, TimeoutError)):
                async with asyncio.timeout(3):
                    await op.kv_put(subjects.cordons_bucket(F), "node-1", b"{}")
            # Read node-2's desired key: get, snapshot, watch.
            with pytest.raises((BusError, TimeoutError)):
                async with asyncio.timeout(3):
                    await node1.kv_get(subjects.desired_bucket(F), "node-2.hello")
            with pytest.raises((BusError, TimeoutError)):
                async with asyncio.timeout(3):
                    await node1.kv_entries(subjects.desired_bucket(F), "node-2.*")
            seen: list[object] = []

            async def watch() -> None:
                async for e in node1.watch(subjects.desired_bucket(F), "node-2.*"):
                    seen.append(e)
            watcher = asyncio.create_task(watch())
            await asyncio.sleep(3)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            assert seen == []

            # Subscribe to every inbox and the whole fleet namespace, then cause traffic on both
            # (an operator's API request and its reply, node-2's heartbeats).
            spied: list[str] = []

            async def spy(subject: str, _: bytes) -> None:
                spied.append(subject)
            for wide in ("_INBOX.>", "fw.>", "$KV.>", "_OPS_admin.>", "_INBOX_node-2.>", "_FWO.>",
                         "_FWN.>", "_FWN.node-2.>"):
                await node1.subscribe(wide, spy)
            code, _, err = await fleetwave(*fleet.client_args(), "nodes")
            assert code == 0, err
            await asyncio.sleep(1.5)
            assert spied == []

            # Publish node-2's heartbeat, and call the API's deploy.
            await node1.publish(subjects.heartbeat(F, "node-2"), b"{}")
            with pytest.raises((BusError, TimeoutError)):
                async with asyncio.timeout(6):
                    await node1.request(subjects.api(F, "node-1", "deploy"), b"{}", timeout=3)

            # No TLS at all; a CA that did not sign the server's certificate.
            with pytest.raises(AccessDenied):
                await Bus.connect(fleet.nats_url, F, creds=node2_creds, connect_deadline=5)
            other = AuthDir(tmp_path / "other")
            other.init(F, (), "admin")
            with pytest.raises(AccessDenied, match="did not sign"):
                await Bus.connect(fleet.nats_url, F, creds=node2_creds, connect_deadline=5,
                                  tls_ca=str(tmp_path / "other" / CA))

            # Revoke node-2: its agent is disconnected, its creds refused, node-1 stays.
            code, _, err = await fleetwave("auth", "revoke", str(fleet.auth_dir), "node-2")
            assert code == 0, err
            await wait_until(lambda: _refused(fleet, node2_creds), bool, timeout=10,
                             what="node-2's revoked credentials to be refused")
            with pytest.raises(AccessDenied, match="revoked"):
                await Bus.connect(fleet.nats_url, F, creds=node2_creds, connect_deadline=5,
                                  tls_ca=str(fleet.auth_dir / CA))
            assert node1.connected and node1.reconnects == 0
            rows = await wait_until(lambda: _nodes(fleet), lambda r: not r["node-2"]["online"],
                                    timeout=15, what="node-2's agent cut off by the revocation")
            assert rows["node-1"]["online"]

            # The fleet is unchanged.
            assert await desired_states(op, F) == desired_before
            assert {e.key for e in await op.kv_entries(subjects.rollouts_bucket(F))} == \
                rollouts_before
            after = await op.kv_get(subjects.observed_bucket(F), "node-2.hello")
            assert after is not None and after.value != b"{}"
        finally:
            await node1.close()
            await op.close()
        log = await read_text(tmp_path / "fleet" / "jetstream" / "nats-server.log")
        for refused in (
            'Publish Violation - Subject "$KV.fw-default-observed.node-2.hello"',
            'Publish Violation - Subject "$JS.API.STREAM.MSG.GET.KV_fw-default-desired"',
            "Publish Violation - Subject \"$JS.API.CONSUMER.CREATE.KV_fw-default-desired.",
            'Subscription Violation - Subject "_INBOX.>"',
            'Subscription Violation - Subject "fw.>"',
            'Subscription Violation - Subject "$KV.>"',
            'Publish Violation - Subject "$KV.fw-default-nodes.node-2"',
            'Publish Violation - Subject "$KV.fw-default-desired.node-1.hello"',
            'Publish Violation - Subject "$KV.fw-default-rollouts.forged"',
            'Publish Violation - Subject "$KV.fw-default-locks.hello"',
            'Publish Violation - Subject "$JS.API.STREAM.PURGE.KV_fw-default-desired"',
            'Publish Violation - Subject "fw.default.hb.node-2"',
            'Publish Violation - Subject "fw.default.api.node-1.deploy"',
        ):
            assert refused in log, refused
        agent2 = await read_text(tmp_path / "fleet" / "logs" / "node-2.log")
        assert "Traceback" not in agent2
        assert "refused the node 'node-2' credentials" in agent2  # once, saying why
        assert agent2.count("refused the node") == 1


async def _nodes(fleet: DevFleet) -> dict[str, dict[str, object]]:
    code, out, err = await fleetwave(*fleet.client_args(), "nodes", "-o", "json")
    assert code == 0, err
    return {row["id"]: row for row in json.loads(out)}


async def _refused(fleet: DevFleet, creds: creds_file.Creds) -> bool:
    assert fleet.auth_dir is not None
    try:
        bus = await Bus.connect(fleet.nats_url, F, creds=creds, connect_deadline=3,
                                tls_ca=str(fleet.auth_dir / CA))
    except AccessDenied:
        return True
    await bus.close()
    return False


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_bad_credentials_and_ca_get_one_clear_line(tmp_path: Path) -> None:
    """A creds file of the wrong node (agent), a revoked operator, a wrong CA, no TLS CA and a
    missing auth DIR: each one line saying what to do, the documented exit code, no
    traceback."""
    async with DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        d = fleet.auth_dir
        assert d is not None
        url = fleet.nats_url
        code, err = await _run(
            sys.executable, "-m", "agent.main", "--node-id", "node-2", "--nats", url,
            "--creds", str(d / "nodes" / "node-1.creds"), "--tls-ca", str(d / CA),
            "--data-dir", str(tmp_path / "n2"))
        assert code == 2 and "are node 'node-1''s, not node 'node-2''s" in err, err
        cases: list[tuple[list[str], int, str]] = []
        code, _, err = await fleetwave("auth", "add-operator", str(d), "bob")
        assert code == 0, err
        bob = tmp_path / "bob.creds"
        bob.write_bytes((d / "operators" / "bob.creds").read_bytes())
        code, _, err = await fleetwave("auth", "revoke", str(d), "bob")
        assert code == 0, err
        AuthDir(tmp_path / "other").init("default", (), "admin")
        cases = [
            (["--nats", url, "--creds", str(bob), "--tls-ca", str(d / CA), "nodes"], 1,
             "refused the operator 'bob' credentials"),
            (["--nats", url, "--creds", str(d / "operators" / "admin.creds"), "--tls-ca",
              str(tmp_path / "other" / CA), "nodes"], 1, "did not sign"),
            (["--nats", url, "--creds", str(d / "operators" / "admin.creds"), "nodes"], 1,
             "--tls-ca"),
            (["--nats", url, "--creds", str(tmp_path / "nope.creds"), "nodes"], 2,
             "does not exist"),
            (["auth", "add-node", str(tmp_path / "missing"), "node-9"], 2, "does not exist"),
            (["broker", "--auth", str(tmp_path / "missing"), "--port", "1"], 2,
             "does not exist"),
            (["auth", "init", str(d)], 2, "already exists"),
        ]
        # The broker reloads the users within AUTH_POLL of the revocation: wait for bob's
        # refusal (bounded), not for a fixed time.
        await wait_until(lambda: fleetwave(*cases[0][0]), lambda r: r[0] == cases[0][1],
                         timeout=10, interval=0.1, what="bob's revocation to be reloaded")
        for args, want, says in cases:
            code, out, err = await fleetwave(*args)
            lines = err.strip().splitlines()
            assert code == want and len(lines) == 1 and says in err, (args, code, err)
            assert "Traceback" not in err + out
