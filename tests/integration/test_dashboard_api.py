"""The dashboard's JSON API on a standby coordinator of a real dev fleet (3 agents).

The fleet's own coordinator leads; a second one, started with ``--http`` and ``--http-tokens``,
stands by. Actions sent to the standby's dashboard reach the leader through the same API path
as the CLI's and are recorded with who = the token's name; what the standby's page reads is
exactly what ``fleetwave status -o json`` prints.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

from coordinator.dev.broker import free_port
from coordinator.dev.devfleet import DevFleet
from tests.integration.e2e_support import deploy_detached, install, push, status, told
from tests.integration.procs import (
    fleetwave,
    hello_bundle,
    reaping,
    spawn_coordinator,
    wait_until,
)
from tests.integration.test_dashboard_browser import HTTP_HOST, SUBNET, add_token, call


def _first_snapshot(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10.0) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                doc: dict[str, Any] = json.loads(line[len("data: "):])
                return doc
    raise AssertionError("the stream ended without a snapshot")


async def test_actions_on_a_standby_reach_the_leader_as_the_tokens_operator(
    tmp_path: Path,
) -> None:
    """Pause, resume and abort through the standby's dashboard: the leader carries each out,
    the events name the token's operator; a rollback with nothing to roll back to is a 400 with
    the API's own line; the standby's JSON equals ``fleetwave status -o json``."""
    token, tokens_file = await add_token(tmp_path / "web", "carol")
    fleet = DevFleet(tmp_path / "fleet", agents=3, subnet=SUBNET, heartbeat_interval=0.5)
    port = free_port(HTTP_HOST)
    base = f"http://{HTTP_HOST}:{port}"
    async with fleet:
        url = fleet.nats_url
        standby = spawn_coordinator(url, tmp_path / "standby", extra=[
            "coordinator", "--key-file", str(fleet.key_file), "--http", f"{HTTP_HOST}:{port}",
            "--http-tokens", str(tokens_file)])
        async with reaping(standby):
            await wait_until(lambda: call(f"{base}/readyz"),
                             lambda r: r[0] == 200 and r[1]["role"] == "standby", timeout=30,
                             what="the second coordinator ready as a standby")
            await push(url, "1.0.0", "2.0.0")
            await install(fleet, "1.0.0")
            rid = await deploy_detached(url, "2.0.0", "--strategy", "canary", "--weights",
                                        "25,50,100", "--bake", "30s")
            await wait_until(lambda: status(url, rid), lambda st: st["state"] == "running",
                             timeout=20, what="the canary running")

            code, body = await call(f"{base}/api/rollouts/{rid}/pause", "POST", token)
            assert code == 200 and body["who"] == "carol", body
            assert body["data"]["state"] == "paused" and body["data"]["paused_by"] == "carol"
            code, body = await call(f"{base}/api/rollouts/{rid}/pause", "POST", token)
            assert code == 409 and "\n" not in body["error"], body  # paused already: conflict
            code, body = await call(f"{base}/api/rollouts/{rid}/resume", "POST", token)
            assert code == 200 and body["data"]["state"] == "running", body

            snap = await asyncio.to_thread(_first_snapshot, f"{base}/api/stream?rollout={rid}")
            assert snap["role"] == "standby" and snap["writable"] is True
            assert snap["rollout"]["id"] == rid
            assert {n["id"] for n in snap["nodes"]} == {"node-1", "node-2", "node-3"}
            assert [e["kind"] for e in snap["events"]][:1] == ["rollout.started"]

            code, body = await call(f"{base}/api/rollouts/{rid}/abort", "POST", token)
            assert code == 200 and body["data"]["state"] == "aborted", body
            evs = await told(url, rid, "rollout.aborted")
            who = {e["kind"]: e["who"] for e in evs
                   if e["kind"] in ("rollout.paused", "rollout.resumed", "rollout.aborted")}
            assert who == {"rollout.paused": "carol", "rollout.resumed": "carol",
                           "rollout.aborted": "carol"}, who

            code, body = await call(f"{base}/api/services/hello/rollback", "POST", token)
            assert code == 400 and "--to VERSION" in body["error"], body

            code, page = await call(f"{base}/api/rollouts/{rid}")
            assert code == 200 and page == await status(url, rid)
            code, rows = await call(f"{base}/api/rollouts?service=hello")
            assert code == 200 and [r["service"] for r in rows] == ["hello", "hello"]
            assert rows[0]["id"] == rid  # newest first: the canary, then the install
            assert await call(f"{base}/api/rollouts?service=other") == (200, [])
            code, body = await call(f"{base}/api/rollouts/nope")
            assert code == 404 and "no rollout 'nope'" in body["error"]


async def test_on_a_secure_fleet_the_coordinators_credentials_name_the_tokens_operator(
    tmp_path: Path,
) -> None:
    """With credentials the server proves every caller: the coordinator's own may name the
    token's operator, so a dashboard pause and abort are carried out and recorded as hers
    (not as the fleet's operator, nor as "coordinator")."""
    token, tokens_file = await add_token(tmp_path / "web", "dana")
    fleet = DevFleet(tmp_path / "fleet", agents=3, subnet=SUBNET, heartbeat_interval=0.5,
                     secure=True)
    port = free_port(HTTP_HOST)
    base = f"http://{HTTP_HOST}:{port}"
    fleet.coordinator.argv += ["--http", f"{HTTP_HOST}:{port}", "--http-tokens", str(tokens_file)]

    async def cli(*args: str) -> str:
        code, out, err = await fleetwave(*fleet.client_args(), *args, timeout=60)
        assert code == 0, f"fleetwave {' '.join(args)} failed ({code}): {out}{err}"
        return out

    async with fleet:
        await cli("release", "push", str(hello_bundle("1.0.0")))
        rid = (await cli("deploy", "hello", "1.0.0", "--batch", "1", "--bake", "30s",
                         "--detach")).strip()
        await wait_until(lambda: call(f"{base}/api/rollouts/{rid}"),
                         lambda r: r[0] == 200 and r[1]["state"] == "running", timeout=20,
                         what="the rollout running")
        code, body = await call(f"{base}/api/rollouts/{rid}/pause", "POST", token)
        assert code == 200 and body["data"]["paused_by"] == "dana", body
        code, body = await call(f"{base}/api/rollouts/{rid}/abort", "POST", token)
        assert code == 200 and body["data"]["aborted_by"] == "dana", body
        evs = [json.loads(line) for line in
               (await cli("events", "--rollout", rid, "-o", "json")).splitlines()]
        who = {e["kind"]: e["who"] for e in evs if e["kind"] in ("rollout.paused",
                                                                 "rollout.aborted")}
        assert who == {"rollout.paused": "dana", "rollout.aborted": "dana"}, who
        assert {e["who"] for e in evs if e["kind"] == "rollout.started"} == {fleet.caller}
