"""Notifications end to end: a dev fleet of real agents rolled with the real CLI, a coordinator
started with ``--notify`` for real local HTTP receivers (asyncio servers on 127.0.60.10x): one
that answers at once and checks the HMAC, one that answers 500 before 200, one that is slow, one
that is down when the rollout starts. Each must get exactly one notification per notable event
of the events stream, the prompt one within a second of the event; a coordinator restarted
mid-rollout sends none twice."""

from __future__ import annotations

import asyncio
import getpass
import json
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.dev.devfleet import Child, DevFleet
from coordinator.runtime import notify_doc as doc
from protocol import subjects
from protocol.bus import Bus
from tests.integration.e2e_support import (
    Receiver,
    deploy_detached,
    events_of,
    install,
    leader_of,
    loaded,
    push,
    receivers,
    status,
)
from tests.integration.procs import fleetwave, hello_bundle, wait_until

SUBNET = "127.0.60"
SECRET = "s3cret-for-tests"
DEPLOY_TIMEOUT = 90.0


def notable(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The events of a rollout a person is notified of, by id."""
    return {e["id"]: e for e in events if e["kind"] in doc.NOTABLE}


def fleet_with(tmp_path: Path, agents: int, *targets: Receiver, secure: bool = False) -> DevFleet:
    fleet = DevFleet(tmp_path / "fleet", agents=agents, subnet=SUBNET, heartbeat_interval=0.5,
                     secure=secure)
    for r in targets:
        fleet.coordinator.argv += ["--notify", r.url]
    fleet.coordinator.argv += ["--notify-secret", SECRET]
    return fleet


async def finished(url: str, rid: str) -> dict[str, Any]:
    return await wait_until(lambda: status(url, rid), lambda s: s["state"] == "succeeded",
                            timeout=DEPLOY_TIMEOUT, what=f"rollout {rid} succeeded")


def assert_once_each(r: Receiver, expected: dict[str, dict[str, Any]]) -> None:
    ids = [d["id"] for d in r.documents()]
    assert len(ids) == len(set(ids)), f"{r.host}: duplicates in {ids}"
    assert set(ids) == set(expected), (
        f"{r.host}: got {sorted(d['what'] for d in r.documents())}, events "
        f"{sorted(e['kind'] for e in expected.values())}")


async def test_every_receiver_gets_each_event_once(tmp_path: Path) -> None:
    """A rolling rollout of 2 waves: the prompt receiver gets every notable event once, within
    1 s, signed; the one that answers 500 first gets each after one retry; the slow one and
    the one that was down get them all later, once; the rollout never waits for any of them."""
    prompt = Receiver(f"{SUBNET}.101")
    flaky = Receiver(f"{SUBNET}.102", first=[500])
    slow = Receiver(f"{SUBNET}.103", delay=3.0)
    down = Receiver(f"{SUBNET}.104")
    for r in (prompt, flaky, slow):
        await r.start()
    down.reserve()
    async with receivers(prompt, flaky, slow, down), \
            fleet_with(tmp_path, 2, prompt, flaky, slow, down) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0")
        began = time.monotonic()
        rid = await deploy_detached(url, "1.0.0", "--batch", "1", "--bake", "1s")
        await wait_until(lambda: asyncio.sleep(0, down.posts), lambda n: n == 0 and
                         time.monotonic() - began > 2.0, timeout=10, what="2 s of downtime")
        await down.start()
        record = await finished(url, rid)
        took = record["finished"] - record["created"]
        expected = notable(await events_of(url, rid))
        assert {e["kind"] for e in expected.values()} >= {"rollout.started", "rollout.succeeded"}
        for r in (prompt, flaky, slow, down):
            await wait_until(lambda r=r: asyncio.sleep(0, len(r.accepted)),
                             lambda n: n >= len(expected), timeout=60,
                             what=f"{r.host}: {len(expected)} notifications")
        await asyncio.sleep(1.5)  # any duplicate would be on its way by now
        for r in (prompt, flaky, slow, down):
            assert_once_each(r, expected)

        lags = [arrived - expected[json.loads(body)["id"]]["time"]
                for arrived, _, body in prompt.accepted]
        assert max(lags) < 1.0, f"notified {max(lags):.2f}s after the event"
        for _, headers, body in prompt.accepted:
            assert doc.verify(SECRET.encode(), body, headers, now=time.time())
        assert all(n == 2 for n in flaky.tries.values()), flaky.tries
        # The slow receiver took 3 s per notification: had the rollout waited on it, it would
        # have taken that long per event.
        assert took < 3.0 * len(expected), f"the rollout took {took:.1f}s"
        last_slow = max(arrived for arrived, _, _ in slow.accepted)
        assert last_slow > record["finished"], "the slow receiver was never behind the rollout"

        started = next(d for d in prompt.documents() if d["what"] == "started")
        assert (started["service"], started["to_version"], started["rollout"]) == (
            "hello", "1.0.0", rid)
        assert started["who"] and started["strategy"] == "rolling"

        log = (fleet.dir / "logs" / "coordinator.log").read_text()
        assert "attempt 1/6: HTTP 500; retrying in 1s" in log
        assert "cannot connect" in log and "not-in-logs" not in log
        print(f"\nrollout {took:.1f}s, {len(expected)} notable events, prompt receiver's worst "
              f"lag {max(lags) * 1000:.0f} ms")


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_a_restarted_coordinator_sends_nothing_twice(tmp_path: Path, how: str) -> None:
    """The coordinator is stopped (SIGTERM, or SIGKILL as in a crash) once the first
    notifications are out and started again while the rollout goes on: every notable event
    still arrives exactly once."""
    prompt = Receiver(f"{SUBNET}.105")
    await prompt.start()
    async with receivers(prompt), fleet_with(tmp_path, 3, prompt) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0")
        rid = await deploy_detached(url, "1.0.0", "--batch", "1", "--bake", "2s")
        await wait_until(lambda: asyncio.sleep(0, [d["what"] for d in prompt.documents()]),
                         lambda whats: "wave_passed" in whats, timeout=30,
                         what="the first wave's notification")
        await (fleet.coordinator.stop() if how == "stop" else fleet.coordinator.kill())
        assert "succeeded" not in [d["what"] for d in prompt.documents()]
        await fleet.coordinator.start()
        await finished(url, rid)
        expected = notable(await events_of(url, rid))
        await wait_until(lambda: asyncio.sleep(0, len(prompt.accepted)),
                         lambda n: n >= len(expected), timeout=30,
                         what=f"{len(expected)} notifications")
        await asyncio.sleep(1.5)
        assert_once_each(prompt, expected)
        assert sum(d["what"] == "wave_passed" for d in prompt.documents()) == 3


async def told(r: Receiver, rid: str, what: str) -> dict[str, Any]:
    """The notification ``what`` of rollout ``rid`` once ``r`` got it."""
    def find(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [d for d in docs if d["rollout"] == rid and d["what"] == what]
    docs = await wait_until(lambda: asyncio.sleep(0, r.documents()), lambda d: bool(find(d)),
                            timeout=30, what=f"{what} of {rid}")
    [found] = find(docs)
    return found


async def test_failures_and_steering_are_told_with_figures_and_who(tmp_path: Path) -> None:
    """A canary of 2.2.0 (every other answer a 500) under traffic: its failed gate is told with
    the error rate, then the rollback; a rollout paused, resumed and aborted by an operator is
    told each time with who did it and why."""
    prompt = Receiver(f"{SUBNET}.106")
    await prompt.start()
    async with receivers(prompt), fleet_with(tmp_path, 2, prompt) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.2.0", "2.0.0")
        await install(fleet, "1.0.0")
        async with loaded(fleet):
            code, out, err = await fleetwave(
                "deploy", "hello", "2.2.0", "--strategy", "canary", "--steps", "1,100%",
                "--bake", "3s", "--max-error-rate", "5%", "--min-requests", "10",
                nats_url=url, timeout=DEPLOY_TIMEOUT)
        assert code == 3, f"2.2.0 should roll back, got {code}: {out}{err}"
        rid = (await status(url))["id"]
        gate = await told(prompt, rid, "gate_failed")
        assert gate["severity"] == "critical" and gate["wave"] == 0
        assert gate["figures"]["error_rate"] > 0.05, gate["figures"]
        assert (gate["from_version"], gate["to_version"], gate["strategy"]) == (
            "1.0.0", "2.2.0", "canary")
        assert gate["who"] == "coordinator"
        rolled = await told(prompt, rid, "rolled_back")
        assert "max-error-rate" in rolled["reason"] or "error rate" in rolled["reason"], rolled

        rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "60s")
        operator = subjects.caller_token(getpass.getuser())  # how the CLI names itself here
        for verb in ("pause", "resume", "abort"):
            code, out, err = await fleetwave(verb, rid, nats_url=url)
            assert code == 0, f"{verb}: {out}{err}"
            what = {"pause": "paused", "resume": "resumed", "abort": "aborted"}[verb]
            note = await told(prompt, rid, what)
            assert note["who"] == operator, note
        assert (await told(prompt, rid, "paused"))["reason"]


async def all_acknowledged(bus: Bus, target: Receiver) -> bool:
    """Whether ``target``'s durable consumer has acknowledged everything it was handed."""
    consumer = doc.parse_target(target.url).consumer
    info = await bus.js.consumer_info(subjects.events_stream(bus.fleet), consumer)
    return info.num_ack_pending == 0


async def test_a_standby_taking_over_goes_on_where_the_leader_stopped(tmp_path: Path) -> None:
    """Two coordinators with the same URL: the leader is killed after the first wave's
    notification; the standby takes over and every notable event arrives exactly once."""
    prompt = Receiver(f"{SUBNET}.108")
    await prompt.start()
    async with receivers(prompt), fleet_with(tmp_path, 3, prompt) as fleet:
        other = Child("coordinator-2", [*fleet.coordinator.argv],
                      fleet.dir / "logs" / "coordinator-2.log")
        await other.start()
        bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="notify-test")
        try:
            url = fleet.nats_url
            await push(url, "1.0.0")
            rid = await deploy_detached(url, "1.0.0", "--batch", "1", "--bake", "2s")
            await wait_until(lambda: asyncio.sleep(0, [d["what"] for d in prompt.documents()]),
                             lambda whats: "wave_passed" in whats, timeout=30,
                             what="the first wave's notification")
            # The one documented window for a second copy is a POST that reached the receiver
            # right before its sender died unacknowledged (receivers de-duplicate on the id):
            # kill the leader outside it, once the consumer has that notification acknowledged.
            await wait_until(lambda: all_acknowledged(bus, prompt), lambda done: done,
                             timeout=15, what="the first wave's notification acknowledged")
            lease = await leader_of(bus)
            leader = other if lease.get("pid") == other.pid else fleet.coordinator
            await leader.kill()
            await wait_until(lambda: leader_of(bus),
                             lambda d: d.get("holder") not in (None, lease["holder"]),
                             timeout=15, what="the standby to lead")
            await finished(url, rid)
            expected = notable(await events_of(url, rid))
            await wait_until(lambda: asyncio.sleep(0, len(prompt.accepted)),
                             lambda n: n >= len(expected), timeout=30,
                             what=f"{len(expected)} notifications")
            await asyncio.sleep(1.5)
            assert_once_each(prompt, expected)
        finally:
            await bus.close()
            await other.stop()


async def test_a_secure_fleets_coordinator_may_notify(tmp_path: Path) -> None:
    """With TLS and per-role credentials the coordinator's own may make and read its durable
    consumers: a rollout is told from start to end, with the operator who asked."""
    prompt = Receiver(f"{SUBNET}.107")
    await prompt.start()
    async with receivers(prompt), fleet_with(tmp_path, 1, prompt, secure=True) as fleet:
        code, _, err = await fleetwave(*fleet.client_args(), "release", "push",
                                       str(hello_bundle("1.0.0")))
        assert code == 0, err
        code, out, err = await fleetwave(*fleet.client_args(), "deploy", "hello", "1.0.0",
                                         "--detach")
        assert code == 0, f"{out}{err}"
        rid = out.strip()
        assert (await told(prompt, rid, "started"))["who"] == fleet.caller
        await told(prompt, rid, "succeeded")


async def test_a_bad_notify_url_is_one_line_and_exit_2() -> None:
    """``--notify ftp://...`` is refused at start with what to give instead."""
    code, _, err = await fleetwave("coordinator", "--notify", "ftp://example.com/x",
                                     nats_url="nats://127.0.0.1:1")
    assert code == 2
    assert err.strip().count("\n") == 0 and "http(s)://" in err and "Traceback" not in err
