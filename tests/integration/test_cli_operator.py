"""The operator's CLI against a real dev fleet (2 agents on 127.0.87.1-2, the example ``hello``):
retried pause, resume and abort say "(already)" and exit 0; an empty rollout id is refused
before anything moves; a writing request to a frozen coordinator says it may still be carried
out; ``events -o json`` is JSON Lines; a fleet with no events stream is one line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from coordinator.dev.devfleet import DevFleet
from tests.integration.e2e_support import deploy_detached, install, push, status
from tests.integration.procs import fleetwave, wait_until

SUBNET = "127.0.87"


async def test_retries_empty_ids_timeouts_and_events(tmp_path: Path) -> None:
    """On one rollout baking for ever: pause, resume and abort, each twice (the second says
    "(already)", exit 0); ``pause ""`` is exit 2 and pauses nothing; a pause sent to the
    frozen coordinator times out saying it may still be done, and is (a retry then says
    "already"); the audit log's -o json lines parse one by one; ``--fleet typo events`` is one
    line."""
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "1h")
        await wait_until(lambda: status(url, rid),
                         lambda s: s["waves"] and s["waves"][0]["state"] == "baking",
                         timeout=60, what="the first wave to bake")

        for args in (("pause", ""), ("abort", " "), ("status", "")):
            code, out, err = await fleetwave(*args, nats_url=url)
            assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (args, err)
            assert "is empty; pass a rollout's id" in err, err
        assert (await status(url, rid))["state"] == "running"

        for verb, state in (("pause", "paused"), ("resume", "running")):
            code, out, err = await fleetwave(verb, rid, nats_url=url)
            assert code == 0 and out.startswith(f"rollout {rid}: {state}"), (verb, out, err)
            assert "(already)" not in out
            code, out, err = await fleetwave(verb, rid, nats_url=url)
            assert (code, out) == (0, f"rollout {rid}: {state} (already)\n"), (verb, out, err)

        # A pause the frozen coordinator takes in, and carries out once it runs again.
        fleet.coordinator.signal(signal.SIGSTOP)
        try:
            code, out, err = await fleetwave("pause", rid, nats_url=url)
        finally:
            fleet.coordinator.signal(signal.SIGCONT)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
        assert "did not answer within" in err and "it may still carry the request out: check " \
            f"'fleetwave status {rid}' before you retry" in err, err
        await wait_until(lambda: status(url, rid), lambda s: s["state"] == "paused",
                         timeout=30, what="the unanswered pause to be carried out")
        code, out, err = await fleetwave("pause", rid, nats_url=url)
        assert (code, out) == (0, f"rollout {rid}: paused (already)\n"), err

        code, out, err = await fleetwave("abort", rid, nats_url=url)
        assert code == 0 and out.startswith(f"rollout {rid}: aborted"), err
        code, out, err = await fleetwave("abort", rid, nats_url=url)
        assert (code, out) == (0, f"rollout {rid}: aborted (already)\n"), err
        code, out, err = await fleetwave("resume", rid, nats_url=url)
        assert code == 1 and "already aborted" in err, (out, err)

        code, out, err = await fleetwave("events", "-o", "json", "--last", "2", nats_url=url)
        lines = out.splitlines()
        assert code == 0 and len(lines) == 2, (out, err)
        assert all(isinstance(json.loads(line), dict) for line in lines)

        code, out, err = await fleetwave("--fleet", "typo", "events", nats_url=url)
        assert (code, out) == (1, ""), err
        assert err == ("fleetwave: fleet 'typo' has no events yet (no events stream): check "
                       "--fleet, or start a coordinator ('fleetwave coordinator')\n")

        # Ctrl-C while a deploy is followed: exit 130, the rollout runs on, and the line says
        # which and how to follow it again.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWAVE_")}
        env["FLEETWAVE_NATS"] = url
        follower = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from coordinator.console import run; run()", "deploy",
            "hello", "1.0.0", "--batch", "1", "--bake", "1h",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        try:
            assert follower.stderr is not None
            async with asyncio.timeout(60):  # following: it says so once it has the rollout
                said = b""
                while b"following it" not in said:
                    line = await follower.stderr.readline()
                    assert line, f"the follower ended: {said!r}"
                    said += line
            follower.send_signal(signal.SIGINT)
            async with asyncio.timeout(30):
                _out, rest = await follower.communicate()
            err_bytes = said + rest
            latest = await status(url, "")
        finally:
            if follower.returncode is None:
                follower.kill()
                await follower.wait()
        err = err_bytes.decode()
        assert follower.returncode == 130, err
        assert (f"fleetwave: interrupted; rollout {latest['id']} runs on: follow it with "
                f"'fleetwave status {latest['id']}'") in err, err
        assert (await status(url, latest["id"]))["state"] == "running"
