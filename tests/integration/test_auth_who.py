"""``who`` on a secure fleet (real nats-server with generated users, real coordinators, agents
and CLI): every API request names its caller in its subject, the server lets an operator name
only itself, and the coordinator records that name on every event the request causes.

What holds: alice deploys and bob resumes and aborts, and the events and the record say so; alice
asking on bob's subject is refused by the server and changes nothing; a ``who`` in a request
body is ignored; an older CLI's request (no caller in its subject) is refused with "upgrade";
what the coordinator decides by itself says "coordinator"; a write that reaches a standby is
forwarded to the leader with its caller kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.auth.enroll import CA, AuthDir
from coordinator.dev.devfleet import Child, DevFleet, python_module
from protocol import creds as creds_file
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.errors import AccessDenied, BusError
from protocol.messages import ApiReply, RolloutRequest
from tests.integration.procs import fleetwave, hello_bundle, read_text, wait_until

SUBNET = "127.0.51"
F = "default"


def as_operator(fleet: DevFleet, name: str) -> list[str]:
    """The CLI's global options of operator ``name``."""
    assert fleet.auth_dir is not None
    return ["--nats", fleet.nats_url, "--fleet", F, "--creds",
            str(AuthDir(fleet.auth_dir).creds_path("operator", name)),
            "--tls-ca", str(fleet.auth_dir / CA)]


async def cli(fleet: DevFleet, name: str, *args: str) -> str:
    code, out, err = await fleetwave(*as_operator(fleet, name), *args, timeout=60)
    assert code == 0, f"{name}: fleetwave {' '.join(args)} failed ({code}): {out}{err}"
    return out


async def enroll(fleet: DevFleet, *names: str) -> dict[str, Bus]:
    """Add operators ``names``; once the broker has reloaded, a Bus as each."""
    assert fleet.auth_dir is not None
    for name in names:
        code, _, err = await fleetwave("auth", "add-operator", str(fleet.auth_dir), name)
        assert code == 0, err

    async def connect(name: str) -> Bus:
        assert fleet.auth_dir is not None
        creds = creds_file.load(AuthDir(fleet.auth_dir).creds_path("operator", name))
        try:
            return await Bus.connect(fleet.nats_url, F, creds=creds, connect_deadline=3,
                                     tls_ca=str(fleet.auth_dir / CA))
        except AccessDenied as exc:  # not reloaded yet
            raise AssertionError(str(exc)) from None

    return {n: await wait_until(lambda n=n: connect(n), bool, timeout=15,  # type: ignore[misc]
                                what=f"operator {n}'s credentials to be accepted")
            for n in names}


async def ask(bus: Bus, subject: str, body: Any, timeout: float = 10) -> ApiReply:
    return decode(ApiReply, await bus.request(subject, encode(body), timeout=timeout))


async def status(fleet: DevFleet, rid: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(await cli(fleet, "admin", "status", rid, "-o", "json"))
    return doc


async def events(fleet: DevFleet, rid: str = "") -> list[dict[str, Any]]:
    out = await cli(fleet, "admin", "events", *(["--rollout", rid] if rid else []), "-o", "json")
    return [json.loads(line) for line in out.splitlines()]


def by_kind(evs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Each event kind with the ``who`` of its events."""
    out: dict[str, set[str]] = {}
    for e in evs:
        out.setdefault(e["kind"], set()).add(e.get("who", ""))
    return out


async def push(fleet: DevFleet) -> None:
    for v in ("1.0.0", "2.0.0"):
        await cli(fleet, "admin", "release", "push", str(hello_bundle(v)))


async def test_every_event_names_the_operator_whose_request_caused_it(tmp_path: Path) -> None:
    """alice deploys, pauses (with a body claiming bob), bob resumes and aborts: each event says
    who; alice on bob's subject is refused by the server and nothing changes; an older CLI's
    pause is refused with "upgrade"; node events say "coordinator"; ``status`` and ``events``
    show who."""
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        buses = await enroll(fleet, "alice", "bob")
        alice = buses["alice"]
        try:
            await push(fleet)
            rid = (await cli(fleet, "alice", "deploy", "hello", "1.0.0", "--batch", "1",
                             "--bake", "5m", "--detach")).strip()
            await wait_until(lambda: status(fleet, rid),
                             lambda s: s["waves"][0]["state"] == "baking", timeout=60,
                             what="the first wave to bake")

            # alice on bob's subject, on the queue group and on the leader's own: the server
            # refuses both (a permissions violation: no answer), and the rollout goes on.
            lead = await ask(alice, subjects.api(F, "alice", "leader"), {})
            holder = lead.data["holder"]
            for subject in (subjects.api(F, "bob", "pause"),
                            subjects.coordinator_api(F, holder, "bob", "pause")):
                with pytest.raises(BusError):
                    await ask(alice, subject, RolloutRequest(id=rid), timeout=3)
            st = await status(fleet, rid)
            assert (st["state"], st["paused_by"]) == ("running", ""), st

            # A body that claims bob: the subject says alice, and alice it is.
            reply = await ask(alice, subjects.api(F, "alice", "pause"),
                              {"id": rid, "who": "bob", "caller": "bob"})
            assert reply.ok, reply.error
            st = await status(fleet, rid)
            assert (st["state"], st["paused_by"], st["started_by"]) == ("paused", "alice",
                                                                       "alice")
            # An older CLI's subject names no one: refused where credentials prove callers.
            old = await ask(alice, subjects.legacy_api(F, "resume"), RolloutRequest(id=rid))
            assert (old.ok, old.code) == (False, "usage") and "upgrade" in old.error
            assert (await status(fleet, rid))["state"] == "paused"

            await cli(fleet, "bob", "resume", rid)
            await cli(fleet, "bob", "abort", rid)
            st = await status(fleet, rid)
            assert (st["state"], st["aborted_by"], st["started_by"]) == ("aborted", "bob",
                                                                        "alice")
            text = await cli(fleet, "admin", "status", rid)
            assert "started by alice" in text and "aborted by bob" in text, text

            evs = await wait_until(lambda: events(fleet, rid),
                                   lambda e: "rollout.aborted" in by_kind(e), timeout=15,
                                   what="the abort to be recorded")
            who = by_kind(evs)
            assert who["rollout.started"] == {"alice"}, who
            assert who["wave.started"] >= {"alice"}, who
            assert who["rollout.paused"] == {"alice"}, who
            assert who["rollout.resumed"] == {"bob"}, who
            assert who["rollout.aborted"] == {"bob"}, who
            assert all(e.get("who") in ("alice", "bob", "coordinator") for e in evs), evs
            lines = await cli(fleet, "admin", "events", "--rollout", rid)
            assert any("rollout.aborted" in ln and "(by bob)" in ln for ln in lines.splitlines())
            fleet_wide = by_kind(await events(fleet))
            assert fleet_wide["node.online"] == {"coordinator"}, fleet_wide
        finally:
            for bus in buses.values():
                await bus.close()
    log = await read_text(tmp_path / "fleet" / "jetstream" / "nats-server.log")
    refused = [ln for ln in log.splitlines() if "Violation" in ln]
    assert any("fw.default.api.bob.pause" in ln for ln in refused), refused
    assert any(".api.bob.pause" in ln and ".coord." in ln for ln in refused), refused


def standby(fleet: DevFleet) -> Child:
    """A second coordinator of ``fleet`` on the coordinators' credentials and signing key."""
    assert fleet.auth_dir is not None
    return Child("coordinator-2", python_module(
        "coordinator.daemon", "--nats", fleet.nats_url, "--fleet", F, "coordinator",
        "--key-file", str(fleet.key_file),
        "--creds", str(AuthDir(fleet.auth_dir).creds_path("coordinator", "coordinator")),
        "--tls-ca", str(fleet.auth_dir / CA)), fleet.dir / "logs" / "coordinator-2.log")


async def test_a_write_forwarded_by_a_standby_keeps_its_caller(tmp_path: Path) -> None:
    """Writes on the coordinators' queue group reach the leader or the standby; the standby
    forwards them to the leader's own subject naming the same caller, so every event says
    alice, never the coordinators' identity."""
    async with DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        other = standby(fleet)
        await other.start()
        log = fleet.dir / "logs" / "coordinator-2.log"
        # Started is not serving: asked before it joins the queue group, every write went to
        # the leader (40 tries in well under a second, once).
        await wait_until(lambda: read_text(log), lambda text: " ready on " in text,
                         timeout=30, what="the standby serving the API")
        buses = await enroll(fleet, "alice")
        alice = buses["alice"]
        try:
            await push(fleet)
            rid = (await cli(fleet, "alice", "deploy", "hello", "1.0.0", "--bake", "5m",
                             "--detach")).strip()
            await wait_until(lambda: status(fleet, rid), lambda s: s["state"] == "running",
                             timeout=60, what="the rollout to run")
            # The queue group picks a member at random: ask until the standby has forwarded
            # one (each attempt reaches it with probability 1/2; 40 attempts, bounded).
            verbs, sent = ["pause", "resume"], 0
            while "forwarding" not in await read_text(log):
                assert sent < 40, "no write reached the standby in 40 tries"
                reply = await ask(alice, subjects.api(F, "alice", verbs[sent % 2]),
                                  RolloutRequest(id=rid))
                assert reply.ok, reply.error
                sent += 1
            assert "forwarding" in await read_text(log)
            assert "of alice to the leading coordinator" in await read_text(log)
            evs = await wait_until(
                lambda: events(fleet, rid),
                lambda e: sum(x["kind"] in ("rollout.paused", "rollout.resumed")
                              for x in e) == sent,
                timeout=15, what=f"{sent} pauses and resumes recorded")
            asked = [e for e in evs if e["kind"] in ("rollout.paused", "rollout.resumed")]
            assert {e["who"] for e in asked} == {"alice"}, asked
        finally:
            for bus in buses.values():
                await bus.close()
            await other.stop()
