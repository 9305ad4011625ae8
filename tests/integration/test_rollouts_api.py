"""The rollout verbs and CLI against a real broker, a real coordinator process and real agents:
refusals are one line with the right exit code, the per-service lock holds across processes, and
a coordinator killed with SIGKILL drives its rollout again after a restart."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from coordinator.cli.base import Ctx, os_user
from coordinator.cli.client import call
from coordinator.dev.broker import Broker
from coordinator.dev.devfleet import Child, python_module
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.errors import NotReachable
from protocol.messages import DesiredState, KeyRequest, SignedEnvelope
from protocol.signing import load_seed, public_key, verify
from tests.integration.procs import (
    fleetwave,
    hello_bundle,
    nodes_json,
    online,
    reaping,
    spawn_agent,
    wait_until,
)


def coordinator_child(url: str, base: Path) -> Child:
    """The coordinator as operators run it, with its signing key in ``base``."""
    return Child("coordinator", python_module(
        "coordinator.daemon", "--nats", url, "--fleet", "default", "coordinator",
        "--key-file", str(base / "coordinator.seed"),
    ), base / "logs" / "coordinator.log")


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    assert "Traceback" not in text
    return lines[0]


async def key_of(url: str) -> dict[str, str] | None:
    """The coordinator's ``key`` reply, or None while no coordinator answers."""
    try:
        reply: dict[str, str] = await call(Ctx(url, "default"), "key", KeyRequest())
    except NotReachable:
        return None
    return reply


async def ready(url: str, nodes: list[str]) -> None:
    await wait_until(lambda: nodes_json(url), lambda rows: online(rows, nodes), timeout=30,
                     what=f"{nodes} online")


async def test_bad_flags_are_one_line_and_exit_2_without_a_coordinator(tmp_path: Path) -> None:
    """Malformed deploy settings are refused locally, before anything is sent."""
    bad = tmp_path / "rollout.toml"
    bad.write_text('service = "hello"\nversion = "2.0.0"\nmax_unavialable = 1\n')
    cases = [
        (["deploy", "hello", "2.0.0", "--bake", "5"], "--bake"),
        (["deploy", "hello", "2.0.0", "--max-error-rate", "200%"], "--max-error-rate"),
        (["deploy", "hello", "2.0.0", "--strategy", "yolo"], "--strategy"),
        (["deploy", "hello", "2.0.0", "--weights", "5,x"], "--weights"),
        (["deploy", "hello", "2.0.0", "--selector", "nope"], "--selector"),
        (["deploy", "hello"], "SERVICE and a VERSION"),
        (["deploy", "-f", str(bad)], "max_unavialable"),
        (["deploy", "-f", str(tmp_path / "missing.toml")], "cannot read"),
    ]
    for args, needle in cases:
        code, out, err = await fleetwave(*args, nats_url="nats://127.0.0.1:1")
        assert code == 2, (args, code, err)
        assert needle in one_line(err), (args, err)
        assert out == ""


async def test_without_a_coordinator_commands_say_how_to_start_one(broker: Broker) -> None:
    """A broker with no coordinator: one line naming 'fleetwave coordinator', exit 1."""
    for args in (["status"], ["rollouts"], ["pause", "x"], ["deploy", "hello", "1.0.0"]):
        code, _, err = await fleetwave(*args, nats_url=broker.url)
        assert code == 1, (args, err)
        assert "fleetwave coordinator" in one_line(err)


async def test_deploys_locks_requests_and_resume_after_kill(broker: Broker, tmp_path: Path) -> None:
    """Unknown release → exit 2; second deploy → conflict naming the first; pause/resume/abort;
    SIGKILL of the coordinator mid-rollout, and the restarted one drives it again."""
    url = broker.url
    coord = coordinator_child(url, tmp_path)
    # Agents without --trust-key: they refuse every desired state, so the rollout stays in its
    # first wave, which leaves time to poke it.
    agents = [spawn_agent(url, f"node-{i}", tmp_path, labels={"zone": "a"}) for i in (1, 2)]
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(reaping(coord))
        await wait_until(lambda: key_of(url), lambda r: r is not None, timeout=30,
                         what="the coordinator's API (it creates the buckets agents watch)")
        await stack.enter_async_context(reaping(*agents))
        await ready(url, ["node-1", "node-2"])
        code, _, err = await fleetwave("deploy", "hello", "1.0.0", "--detach", nats_url=url)
        assert code == 2 and "release push" in one_line(err)
        code, _, err = await fleetwave("release", "push", str(hello_bundle("1.0.0")), nats_url=url)
        assert code == 0, err

        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--detach", "-o", "json",
                                         "--progress-deadline", "10m", "--prestage", "0",
                                         nats_url=url)  # node-2 gets nothing in wave 0
        assert code == 0, err
        rid = json.loads(out)["id"]
        code, _, err = await fleetwave("deploy", "hello", "1.0.0", "--detach", nats_url=url)
        assert code == 1 and rid in one_line(err) and "already has rollout" in err

        # The first node's desired state is signed by the coordinator's key and verifies.
        bus = await Bus.connect(url, "default")
        try:
            entry = await bus.kv_get(subjects.desired_bucket("default"), "node-1.hello")
            assert entry is not None and entry.value is not None
            env = decode(SignedEnvelope, entry.value)
            pub = public_key(load_seed(tmp_path / "coordinator.seed"))
            desired = verify(env, [pub], fleet="default", node="node-1", service="hello",
                             min_generation=0)
            assert isinstance(desired, DesiredState) and desired.slots["a"].version == "1.0.0"
            assert await bus.kv_get(subjects.desired_bucket("default"), "node-2.hello") is None
        finally:
            await bus.close()

        code, out, _ = await fleetwave("status", "-o", "json", nats_url=url)
        st = json.loads(out)
        assert st["id"] == rid and st["state"] == "running"
        # An open bus: the CLI named its OS user (a claim), and the coordinator recorded it.
        assert st["started_by"] == os_user() != ""
        assert st["waves"][0]["state"] == "updating"
        assert set(st["nodes"]) == {"node-1", "node-2"}

        assert (await fleetwave("pause", rid, nats_url=url))[0] == 0
        code, out, err = await fleetwave("pause", rid, nats_url=url)  # a retry: already so
        assert (code, out) == (0, f"rollout {rid}: paused (already)\n"), err

        await coord.kill()  # SIGKILL: no goodbye
        await coord.start()
        code, out, err = await wait_until(
            lambda: fleetwave("resume", rid, "-o", "json", nats_url=url),
            lambda res: res[0] == 0, timeout=30, what="the restarted coordinator to resume it")
        assert json.loads(out)["state"] == "running"

        code, out, _ = await fleetwave("rollouts", "--service", "hello", "-o", "json",
                                       nats_url=url)
        assert [r["id"] for r in json.loads(out)] == [rid]
        code, out, _ = await fleetwave("abort", rid, nats_url=url)
        assert code == 0 and "aborted" in out
        code, out, err = await fleetwave("events", "--rollout", rid, "-o", "json", nats_url=url)
        kinds = [json.loads(line)["kind"] for line in out.splitlines()]
        assert kinds[0] == "rollout.started" and "rollout.paused" in kinds
        assert kinds[-1] == "rollout.aborted"

        # The lock went with the aborted rollout: the service can be deployed again.
        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--detach", nats_url=url)
        assert code == 0 and out.strip() != rid, err
        code, _, err = await fleetwave("status", "nope", nats_url=url)
        assert code == 1 and "no rollout 'nope'" in one_line(err)
        code, out, _ = await fleetwave("rollback", "nothing-here", nats_url=url)
        assert code == 2


async def test_the_key_verb_names_the_key_file_public_key(broker: Broker, tmp_path: Path) -> None:
    """The coordinator creates its key file 0600 and publishes the matching public key."""
    coord = coordinator_child(broker.url, tmp_path)
    async with reaping(coord):
        reply = await wait_until(lambda: key_of(broker.url), lambda r: r is not None, timeout=30,
                                 what="the key verb")
        code, out, err = await fleetwave("key", nats_url=broker.url)
    assert reply is not None
    assert (code, out.strip(), err) == (0, reply["public_key"], "")
    seed_file = tmp_path / "coordinator.seed"
    assert seed_file.stat().st_mode & 0o077 == 0
    assert reply["public_key"] == public_key(load_seed(seed_file))
