"""Dashboard tokens bound to a secure fleet's auth directory (real nats-server with generated
users, a real coordinator serving ``--http`` with ``--http-tokens``, a real agent and CLI).

What holds: ``add-web-token DIR NAME --auth-dir AUTH`` takes only an enrolled operator's name;
alice pauses a rollout with her dashboard token, then ``fleetwave auth revoke AUTH alice``: from
the next request on, the running coordinator refuses her token (401, nothing sent: the rollout
stays paused), with the token file unchanged, while bob's token resumes it, recorded as bob.
The coordinator listens on 127.0.83.100; the agent binds 127.0.83.1.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.auth import web_tokens
from coordinator.dev.broker import free_port
from coordinator.dev.devfleet import DevFleet
from tests.integration.procs import fleetwave, wait_until
from tests.integration.test_auth_who import by_kind, cli, events, push, status
from tests.integration.test_dashboard_browser import call

SUBNET = "127.0.83"
HTTP_HOST = "127.0.83.100"


async def auth(*args: str) -> None:
    code, _, err = await fleetwave("auth", *args)
    assert code == 0, f"fleetwave auth {' '.join(args)} failed ({code}): {err}"


async def add_token(directory: Path, name: str, *flags: str) -> tuple[str, Path]:
    code, out, err = await fleetwave("auth", "add-web-token", str(directory), name, *flags,
                                     "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    return str(doc["token"]), Path(doc["file"])


async def test_a_revoked_operators_dashboard_token_is_refused_without_a_restart(
    tmp_path: Path,
) -> None:
    """A token file bound to the auth directory: a name not enrolled gets no token; alice's
    token pauses a rollout, and after ``auth revoke`` it is refused (401, the rollout stays
    paused) while bob's resumes it, each action recorded as its operator."""
    directory = tmp_path / "fleet" / "auth"  # the trust root the dev fleet then serves
    await auth("init", str(directory))
    await auth("add-operator", str(directory), "alice")
    await auth("add-operator", str(directory), "bob")
    web = tmp_path / "web"
    code, _, err = await fleetwave("auth", "add-web-token", str(web), "carol",
                                   "--auth-dir", str(directory))
    assert code == 2 and "'carol' is not an enrolled operator" in err, err
    assert not web.exists()
    alice, tokens_file = await add_token(web, "alice", "--auth-dir", str(directory))
    bob, _ = await add_token(web, "bob")  # the file is bound: checked all the same

    port = free_port(HTTP_HOST)
    base = f"http://{HTTP_HOST}:{port}"
    fleet = DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5, secure=True,
                     subnet=SUBNET)
    fleet.coordinator.argv += ["--http", f"{HTTP_HOST}:{port}", "--http-tokens",
                               str(tokens_file)]
    async with fleet:
        await push(fleet)
        rid = (await cli(fleet, "admin", "deploy", "hello", "1.0.0", "--batch", "1",
                         "--bake", "5m", "--detach")).strip()
        await wait_until(lambda: status(fleet, rid),
                         lambda s: s["waves"][0]["state"] == "baking", timeout=60,
                         what="the first wave to bake")
        assert (await call(f"{base}/api/whoami", token=alice))[1].get("name") == "alice"
        code, body = await call(f"{base}/api/rollouts/{rid}/pause", "POST", alice)
        assert code == 200, body
        st = await status(fleet, rid)
        assert (st["state"], st["paused_by"]) == ("paused", "alice"), st

        await auth("revoke", str(directory), "alice")
        code, body = await call(f"{base}/api/rollouts/{rid}/resume", "POST", alice)
        assert code == 401 and "'alice' is not an enrolled operator" in body["error"], body
        assert (await call(f"{base}/api/whoami", token=alice))[0] == 401
        assert (await status(fleet, rid))["state"] == "paused"
        assert [t.name for t in web_tokens.read(tokens_file)] == ["alice", "bob"]

        code, body = await call(f"{base}/api/rollouts/{rid}/resume", "POST", bob)
        assert code == 200, body
        assert (await status(fleet, rid))["state"] == "running"
        evs = await wait_until(lambda: events(fleet, rid),
                               lambda e: "rollout.resumed" in by_kind(e), timeout=15,
                               what="the resume to be recorded")
        who = by_kind(evs)
        assert (who["rollout.paused"], who["rollout.resumed"]) == ({"alice"}, {"bob"}), who
