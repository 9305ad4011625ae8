"""Expiring credentials on a real secure fleet: a node issued with a short expiry is cut off by
the broker when it passes (no one acting), its agent says why once, everyone else stays
connected; an expired file is refused at start in one line; renewing lets it back in."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.auth.enroll import CA, AuthDir
from coordinator.dev.cluster import monitor_get
from coordinator.dev.devfleet import DevFleet
from protocol import creds as creds_file
from tests.integration.procs import (
    fleetwave,
    read_text,
    reaping,
    run_output,
    spawn_agent,
    wait_until,
)

SUBNET = "127.0.54"
LIFETIME = 12  # seconds node-3's credentials last: long enough for its agent to connect first


async def _agent_conns(fleet: DevFleet) -> dict[str, int]:
    """The broker's client connections of agents, as {name: connection id}."""
    doc: dict[str, Any] = await asyncio.to_thread(
        monitor_get, fleet.broker.monitor_port, "/connz?limit=1024")
    return {c["name"]: c["cid"] for c in doc.get("connections") or []
            if str(c.get("name", "")).startswith("fleetwave-agent-")}


async def test_a_node_is_cut_off_at_its_expiry_and_back_after_renewal(tmp_path: Path) -> None:
    """node-3, issued for a few seconds, is disconnected by the broker once its expiry passes
    (not before), node-1 and node-2 keep their connections; node-3's agent says once that its
    credentials expired and how to renew them; a new agent with the expired file exits 2 with
    one line; after 'auth renew' the running agent gets back in by itself."""
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        d = fleet.auth_dir
        assert d is not None
        code, _, err = await fleetwave("auth", "add-node", str(d), "node-3",
                                       "--expires", f"{LIFETIME}s")
        assert code == 0, err
        creds_path = d / "nodes" / "node-3.creds"
        expires = creds_file.load(creds_path).expires
        assert expires is not None
        agent = spawn_agent(fleet.nats_url, "node-3", tmp_path, interval=0.5, extra=[
            "--creds", str(creds_path), "--tls-ca", str(d / CA),
            "--bind-host", f"{SUBNET}.3"])
        async with reaping(agent):
            before = await wait_until(lambda: _agent_conns(fleet),
                                      lambda c: "fleetwave-agent-node-3" in c, timeout=LIFETIME,
                                      what="node-3's agent connected")
            # Cut off at expiry, not before (polled; the wall clock says when it went).
            last_seen = time.time()
            while True:
                conns = await _agent_conns(fleet)
                if "fleetwave-agent-node-3" not in conns:
                    break
                last_seen = time.time()
                assert last_seen < expires.timestamp() + 10, "node-3 still connected"
                await asyncio.sleep(0.1)
            assert last_seen >= expires.timestamp() - 0.2, "cut off before its expiry"
            for other in ("node-1", "node-2"):  # the same connections: never dropped
                assert conns[f"fleetwave-agent-{other}"] == before[f"fleetwave-agent-{other}"]

            says = f"credentials of node node-3 expired at {creds_file.format_time(expires)}"
            log = await wait_until(lambda: read_text(agent.log_path), lambda t: says in t,
                                   timeout=10, what="node-3's agent saying why")
            assert "auth renew DIR node-3" in log and "Traceback" not in log

            # A fresh start with the expired file: one line, exit 2 (a configuration error).
            code, out = await run_output(
                sys.executable, "-m", "agent.main", "--node-id", "node-3", "--nats",
                fleet.nats_url, "--creds", str(creds_path), "--tls-ca", str(d / CA),
                "--data-dir", str(tmp_path / "again"))
            assert code == 2 and says in out and len(out.strip().splitlines()) == 1, out

            # Renew: the same key, a new expiry; the running agent reconnects by itself.
            code, out, err = await fleetwave("auth", "renew", str(d), "node-3", "--expires", "1h")
            assert code == 0 and "renewed node 'node-3'" in out, err
            assert creds_file.load(creds_path).expires > dt.datetime.now(dt.UTC)
            await wait_until(lambda: _agent_conns(fleet),
                             lambda c: "fleetwave-agent-node-3" in c, timeout=30,
                             what="node-3's agent back after the renewal")
            log = await read_text(agent.log_path)
            assert log.count("expired at") == 1, log  # said once, not at every retry


async def test_an_expired_operator_gets_one_line(tmp_path: Path) -> None:
    """The CLI with an operator's expired credentials refuses to start: exit 2, one line that
    names the operator and the renew command, no traceback."""
    async with DevFleet(tmp_path / "fleet", agents=0, secure=True, subnet=SUBNET) as fleet:
        d = fleet.auth_dir
        assert d is not None
        code, _, err = await fleetwave("auth", "add-operator", str(d), "bob", "--expires", "1s")
        assert code == 0, err
        args = ["--nats", fleet.nats_url, "--creds", str(d / "operators" / "bob.creds"),
                "--tls-ca", str(d / CA), "nodes"]
        # Until the broker has reloaded its users, bob is refused as unknown (exit 1, "revoked
        # or another fleet's"): with a lifetime of one second that may last past the expiry on
        # a loaded machine. What is checked is what the CLI says once they have expired.
        code, out, err = await wait_until(lambda: fleetwave(*args),
                                          lambda r: r[0] != 0 and "expired" in r[2],
                                          timeout=10, what="bob's credentials to expire")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert "operator bob expired at" in err and "auth renew DIR bob" in err
        assert "Traceback" not in out + err


async def test_an_agent_started_before_the_broker_reloaded_comes_up(tmp_path: Path) -> None:
    """An agent whose key the broker does not know yet (enrolled, users.conf not reloaded) is
    refused at first: it says once that it retries, and comes up by itself, without a restart,
    once the broker has loaded the new users."""
    async with DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        d = fleet.auth_dir
        assert d is not None
        users = d / "users.conf"
        before = users.read_text()
        AuthDir(d).add("node", "node-4")
        _replace(users, before)  # the broker still serves the users without node-4
        agent = spawn_agent(fleet.nats_url, "node-4", tmp_path, interval=0.5, extra=[
            "--creds", str(d / "nodes" / "node-4.creds"), "--tls-ca", str(d / CA),
            "--bind-host", f"{SUBNET}.4"])
        async with reaping(agent):
            await wait_until(lambda: read_text(agent.log_path),
                             lambda t: "retrying for up to" in t, timeout=20,
                             what="node-4's agent refused and retrying")
            assert agent.running
            AuthDir(d).prune()  # users.conf with node-4 again: the broker reloads it
            await wait_until(lambda: _agent_conns(fleet),
                             lambda c: "fleetwave-agent-node-4" in c, timeout=20,
                             what="node-4's agent connected after the reload")
            log = await read_text(agent.log_path)
            assert log.count("retrying for up to") == 1 and "Traceback" not in log, log
            assert agent.running


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole at once (the broker may read it any moment)."""
    tmp = path.with_name(f".{path.name}.test")
    tmp.write_text(text)
    tmp.replace(path)
