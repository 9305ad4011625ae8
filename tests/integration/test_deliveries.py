"""Consumers that deliver onto a stream's subject are removed (``coordinator.runtime
.deliveries``): a push consumer's deliver subject is in its create request's body, where no
permission looks, and such a consumer, woken at a server restart, has its stream's messages
stored by the target stream (a loop of two filled the lease and events streams). Real
nats-server: the leader's sweep, the broker's removal before its server starts, and the
coordinator sweeping when it starts leading."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from coordinator.auth.enroll import CA, AuthDir
from coordinator.dev.broker import Broker, free_port
from coordinator.dev.devfleet import DevFleet
from coordinator.runtime.deliveries import StoreInUse, store_server, sweep, sweep_store
from protocol import creds as creds_file
from protocol import subjects
from protocol.bus import Bus
from tests.integration.procs import execed, fleetwave, read_text, wait_until

F = "default"
SUBNET = "127.0.77"
LEASE = subjects.kv_stream(subjects.lease_bucket(F))
EVENTS = subjects.events_stream(F)


async def _plant(bus: Bus) -> None:
    """Two durable push consumers delivering onto each other's streams: the lease onto an
    event subject, the events onto the lease key."""
    for stream, name, onto in ((LEASE, "lease2evt", subjects.event(F, "zz")),
                               (EVENTS, "evt2lease", f"$KV.{subjects.lease_bucket(F)}.leader")):
        body = {"stream_name": stream, "config": {
            "name": name, "durable_name": name, "deliver_subject": onto, "ack_policy": "none",
            "deliver_policy": "all"}}
        raw = await bus.nc.request(f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
                                   json.dumps(body).encode(), timeout=5)
        assert "error" not in json.loads(raw.data), raw.data


async def _planted(bus: Bus) -> set[str]:
    return {name for stream in (LEASE, EVENTS) for name, _ in await bus.push_consumers(stream)
            if name in ("lease2evt", "evt2lease")}


async def test_the_sweep_deletes_consumers_delivering_onto_the_fleets_subjects() -> None:
    async with Broker() as broker:
        bus = await Bus.connect(broker.url, F)
        try:
            await bus.ensure_fleet()
            await _plant(bus)
            seen: list[bytes] = []

            async def watching() -> None:
                async for entry in bus.watch(subjects.desired_bucket(F), "node-1.*"):
                    if entry is not None and entry.value is not None:
                        seen.append(entry.value)
            watch = asyncio.ensure_future(watching())
            try:
                await wait_until(lambda: _consumers(bus), lambda n: n >= 1, timeout=5,
                                 what="the watch's consumer")
                assert await _planted(bus) == {"lease2evt", "evt2lease"}
                removed = await sweep(bus)
                assert sorted(r.split(" ")[0] for r in removed) == [
                    f"{EVENTS}/evt2lease", f"{LEASE}/lease2evt"]
                assert await _planted(bus) == set()
                # a watch (its deliveries go to an inbox) is kept and goes on
                assert await _consumers(bus) == 1
                await bus.kv_put(subjects.desired_bucket(F), "node-1.web", b"v")
                await wait_until(lambda: _value(seen), lambda got: b"v" in got, timeout=5,
                                 what="the watch still delivering")
            finally:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        finally:
            await bus.close()


async def _value(seen: list[bytes]) -> list[bytes]:
    return list(seen)


async def _consumers(bus: Bus) -> int:
    """Push consumers of the desired bucket (a watch's)."""
    return len(await bus.push_consumers(subjects.kv_stream(subjects.desired_bucket(F))))


async def test_a_broker_restarted_over_its_store_never_wakes_them(tmp_path: Path) -> None:
    """The consumers' files leave the store before the server starts: after the restart
    they are not there (the server recovered none), and neither stream took anything."""
    store = tmp_path / "store"
    async with Broker(store_dir=store) as broker:
        bus = await Bus.connect(broker.url, F)
        try:
            await bus.ensure_fleet()
            await bus.kv_put(subjects.lease_bucket(F), subjects.LEASE_KEY, b"lease")
            await _plant(bus)
            before = {s: (await bus.js.stream_info(s)).state.messages for s in (LEASE, EVENTS)}
        finally:
            await bus.close()
    async with Broker(store_dir=store) as broker:
        bus = await Bus.connect(broker.url, F)
        try:
            assert await _planted(bus) == set()
            after = {s: (await bus.js.stream_info(s)).state.messages for s in (LEASE, EVENTS)}
            assert after == before
        finally:
            await bus.close()


async def test_a_coordinator_sweeps_when_it_starts_leading(tmp_path: Path) -> None:
    async with DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        bus = await Bus.connect(fleet.nats_url, F)
        try:
            await fleet.coordinator.stop()
            await _plant(bus)
            await fleet.coordinator.start()
            await wait_until(lambda: _planted(bus), lambda left: left == set(), timeout=20,
                             what="the new leader's sweep")
            log = await read_text(fleet.dir / "logs" / "coordinator.log")
            assert "delivered onto '$KV.fw-default-lease.leader', which is no inbox" in log
        finally:
            await bus.close()


async def _planted_on(broker: Broker) -> None:
    """The fleet set up on ``broker``, with ``_plant``'s two consumers."""
    bus = await Bus.connect(broker.url, F)
    try:
        await bus.ensure_fleet()
        await _plant(bus)
    finally:
        await bus.close()


async def test_broker_sweep_store_cleans_a_stopped_servers_store(tmp_path: Path) -> None:
    """``fleetwave broker --sweep-store`` (a nats-server of one's own: its ExecStartPre) does
    what the broker does before its server starts, and exits."""
    store = tmp_path / "store"
    async with Broker(store_dir=store) as broker:
        await _planted_on(broker)
    planted = sorted(store.glob("jetstream/*/streams/*/obs/*"))
    assert sorted(p.name for p in planted) == ["evt2lease", "lease2evt"]
    code, out, err = await fleetwave("broker", "--store-dir", str(store), "--sweep-store")
    assert code == 0 and "removed 2 consumer(s)" in out, out + err
    assert not any(p.exists() for p in planted)


async def test_a_live_servers_store_is_neither_swept_nor_shared(tmp_path: Path) -> None:
    """nats-server takes no lock on its store. ``--sweep-store`` on the store of a server that
    runs is refused in one line (exit 1) and removes nothing; a second broker started on it is
    refused the same way before it sweeps or starts anything (it swept the live store, then ran
    a second server on it)."""
    store = tmp_path / "store"
    async with Broker(store_dir=store) as broker:
        await _planted_on(broker)
        planted = sorted(store.glob("jetstream/*/streams/*/obs/*"))
        assert len(planted) == 2
        code, out, err = await fleetwave("broker", "--store-dir", str(store), "--sweep-store")
        assert code == 1, out + err
        assert err.splitlines() == [
            f"fleetwave: the JetStream store in {store} is in use by nats-server (pid "
            f"{broker.pid}): a live server's store is neither swept nor shared; stop it first, "
            "or give this broker another --store-dir"]
        code, out, err = await fleetwave("broker", "--store-dir", str(store), "--port",
                                         str(free_port()))
        assert code == 1 and f"in use by nats-server (pid {broker.pid})" in err, out + err
        assert all(p.exists() for p in planted)
        bus = await Bus.connect(broker.url, F)  # the live server is unharmed
        try:
            assert await _planted(bus) == {"evt2lease", "lease2evt"}
        finally:
            await bus.close()


@pytest.mark.parametrize("names", ["-sd", "--store_dir=", "-c", "--config="])
def test_an_idle_server_is_known_by_its_command_line(tmp_path: Path, names: str) -> None:
    """An idle nats-server closes its message blocks (after 30 s): a server is also known by
    its command line naming the store, or a config file that does (relative paths from its
    working directory). A process named nats-server with no file of the store open, and
    one naming another store, stand for them."""
    store, other = tmp_path / "store", tmp_path / "store2"
    (store / "jetstream").mkdir(parents=True)
    server = tmp_path / "bin" / "nats-server"  # a script: the process is named after it
    server.parent.mkdir()
    server.write_text("#!/bin/sh\nsleep 60\n")
    server.chmod(0o755)
    conf = tmp_path / "nats.conf"

    def naming(path: str) -> list[str]:
        flag = names.rstrip("=")
        value = path if flag in ("-sd", "--store_dir") else str(conf)
        if flag in ("-c", "--config"):
            conf.write_text(f'jetstream {{\n  store_dir: "{path}"\n}}\n')
        return [f"{flag}={value}"] if names.endswith("=") else [flag, value]

    for path, found in (("store2", False), ("store", True)):
        proc = subprocess.Popen([str(server), *naming(path)], cwd=tmp_path,
                                start_new_session=True)
        try:
            asyncio.run(execed(proc.pid))
            assert (store_server(store) is not None) is found, (path, proc.args)
            if found:
                with pytest.raises(StoreInUse, match=rf"in use by nats-server \(pid {proc.pid}\)"):
                    sweep_store(store)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert store_server(store) is None and not other.exists()


@pytest.mark.parametrize(("role", "name", "stream", "onto"), [
    # An operator's consumer of the audit log re-delivering it onto the lease key.
    ("operator", "admin", EVENTS, f"$KV.{subjects.lease_bucket(F)}.leader"),
    # A node's consumer of the releases delivering their chunks onto the pace every agent hears.
    ("node", "node-1", subjects.object_stream(subjects.releases_store(F)), subjects.pace(F)),
])
async def test_the_leader_deletes_a_foreign_consumer_as_it_is_made(
    role: str, name: str, stream: str, onto: str, tmp_path: Path,
) -> None:
    """A consumer made (on a secure fleet, by an operator's or a node's credentials) to deliver
    onto the fleet's subjects is deleted by the leader within moments of its making, not at the
    next sweep (every 5 minutes: the releases' chunks reached every agent meanwhile), and the
    leader's log names the key that made it."""
    async with DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        assert fleet.auth_dir is not None
        creds = creds_file.load(AuthDir(fleet.auth_dir).creds_path(role, name))
        ca = str(fleet.auth_dir / CA)
        them = await Bus.connect(fleet.nats_url, F, creds=creds, tls_ca=ca)
        coord = await Bus.connect(fleet.nats_url, F, tls_ca=ca, creds=creds_file.load(
            AuthDir(fleet.auth_dir).creds_path("coordinator", "coordinator")))
        try:
            await wait_until(lambda: read_text(fleet.dir / "logs" / "coordinator.log"),
                             lambda log: "leads fleet" in log, timeout=20, what="a leader")
            body = {"stream_name": stream, "config": {
                "name": "astray", "durable_name": "astray", "deliver_subject": onto,
                "ack_policy": "none",
                "deliver_policy": "new", "inactive_threshold": 3_600_000_000_000}}
            made = json.loads(await them.request(f"$JS.API.CONSUMER.CREATE.{stream}.astray",
                                                 json.dumps(body).encode(), timeout=5))
            assert "error" not in made, made

            async def names() -> set[str]:
                return {n for n, _ in await coord.push_consumers(stream)}
            await wait_until(names, lambda left: "astray" not in left, timeout=10,
                             what="the leader's guard deleting the consumer")
            who = {"operator": "an operator's credentials (account OPS)",
                   "node": "a node's credentials (account NODES)"}[role]
            said = (f"deleted consumer astray of {stream}: it delivered onto {onto!r}, which "
                    f"is no inbox (made with {who})")
            # (said once the delete is answered: a moment after the consumer is gone)
            await wait_until(lambda: read_text(fleet.dir / "logs" / "coordinator.log"),
                             lambda log: said in log, timeout=10, what=said)
        finally:
            await them.close()
            await coord.close()


async def test_a_refused_audit_subscription_takes_once_the_broker_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A coordinator whose users.conf predates the audit's permission: the server refuses the
    subscription (later, as an asynchronous error; nothing raises), the guard says so and
    tries again; once the users are rendered anew and the broker reloads them, it takes, and a
    foreign consumer is deleted as made. A review found the refusal never retried: the guard
    sat on a dead subscription for the whole leadership."""
    from coordinator.auth import perms
    from coordinator.auth.enroll import COORDINATOR
    from coordinator.runtime.deliveries import AUDIT, guard

    current = perms.coordinator

    def older(fleet: str) -> perms.Permissions:
        p = current(fleet)
        p["subscribe"]["allow"] = [s for s in p["subscribe"]["allow"] if s != AUDIT]
        return p

    monkeypatch.setattr(perms, "coordinator", older)
    auth = AuthDir(tmp_path / "auth")
    await asyncio.to_thread(auth.init, F, (), "ops")
    broker = Broker(store_dir=tmp_path / "js", auth=auth.path)
    await broker.start()
    try:
        ca = str(auth.path / CA)
        coord = await Bus.connect(broker.url, F, tls_ca=ca, creds=creds_file.load(
            auth.creds_path("coordinator", COORDINATOR)))
        ops = await Bus.connect(broker.url, F, tls_ca=ca, creds=creds_file.load(
            auth.creds_path("operator", "ops")))
        task = asyncio.ensure_future(guard(coord, retry=0.3))
        try:
            await coord.ensure_fleet()
            refused = "the server refused the subscription to its audit of consumers made"
            await wait_until(lambda: _said(caplog), lambda text: refused in text, timeout=10,
                             what="the refusal said")
            monkeypatch.setattr(perms, "coordinator", current)
            reloads = broker.reloads
            assert (await asyncio.to_thread(auth.prune))[1]  # users.conf rendered anew
            await wait_until(lambda: _value([broker.reloads]), lambda r: r[0] > reloads,
                             timeout=10, what="the broker's reload")

            async def made() -> bool:  # an operator's consumer of the events onto the lease
                body = {"stream_name": EVENTS, "config": {
                    "name": "astray", "durable_name": "astray", "ack_policy": "none",
                    "deliver_subject": f"$KV.{subjects.lease_bucket(F)}.leader"}}
                raw = await ops.request(f"$JS.API.CONSUMER.CREATE.{EVENTS}.astray",
                                        json.dumps(body).encode(), timeout=5)
                assert "error" not in json.loads(raw), raw
                return True

            deleted = "deleted consumer astray of " + EVENTS
            # (made again until the guard's new subscription takes: each make is audited)
            await wait_until(lambda: _made_then_said(made, caplog),
                             lambda text: deleted in text, timeout=20,
                             what="the consumer deleted as made, once the guard took")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ops.close()
            await coord.close()
    finally:
        await broker.stop()


async def _said(caplog: pytest.LogCaptureFixture) -> str:
    return caplog.text


async def _made_then_said(make: Callable[[], Awaitable[bool]],
                          caplog: pytest.LogCaptureFixture) -> str:
    await make()
    return caplog.text
