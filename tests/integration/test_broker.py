"""The embedded broker: a real nats-server from the wheel, started, crashed, restarted, refused."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.dev.broker import Broker, find_nats_server, free_port, port_in_use
from coordinator.errors import BrokerError
from protocol.bus import Bus

FLEETWAVE = [sys.executable, "-c", "from coordinator.console import run; run()"]


async def test_jetstream_data_survives_a_crash(tmp_path: Path) -> None:
    """A KV write acknowledged before SIGKILL is there after a restart on the same store dir."""
    broker = Broker(store_dir=tmp_path / "js")
    await broker.start()
    try:
        bus = await Bus.connect(broker.url, "t")
        await bus.ensure_fleet()
        await bus.kv_put("fw-t-locks", "k", b"v1")
        await bus.close()
        await broker.kill()
        await broker.start()
        bus = await Bus.connect(broker.url, "t")
        entry = await bus.kv_get("fw-t-locks", "k")
        await bus.close()
    finally:
        await broker.stop()
    assert entry is not None and entry.value == b"v1"


async def test_config_syncs_every_write(tmp_path: Path) -> None:
    """The generated config asks JetStream to fsync every write (Jepsen 2025)."""
    async with Broker(store_dir=tmp_path / "js") as broker:
        conf = (broker.store_dir / "nats-server.conf").read_text()
    assert "sync_interval: always" in conf


async def test_a_port_it_picked_that_gets_taken_is_picked_again(tmp_path: Path) -> None:
    """Between picking a free port and nats-server binding it another process can take it
    (outgoing connections draw from the same range): a broker that chose the port picks again."""
    broker = Broker(store_dir=tmp_path / "js")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker.port))
        squatter.listen()
        taken = broker.port
        async with broker:
            assert broker.port != taken and port_in_use("127.0.0.1", broker.port)


async def test_a_monitor_port_taken_by_another_server_is_picked_again(tmp_path: Path) -> None:
    """The monitor port picked for a broker taken meanwhile by another nats-server, which
    answers its health checks for itself while ours exits ("can't listen to the monitor
    port"): the broker is not taken for started (in CI a cluster then waited 30 s for a member
    that had exited); it picks another port, and its own server serves."""
    async with Broker(store_dir=tmp_path / "other") as other:
        broker = Broker(store_dir=tmp_path / "js")
        broker.monitor_port = other.monitor_port  # as if the other took it after the pick
        async with broker:
            assert broker.monitor_port != other.monitor_port
            bus = await Bus.connect(broker.url, "t")  # ours answers, not only the other
            await bus.close()


async def test_a_dev_fleet_whose_brokers_port_gets_taken_comes_up_on_the_next(
        tmp_path: Path) -> None:
    """The same race under a dev fleet: its coordinator's ``--nats`` was written when the fleet
    was made; it follows the port the broker picked again (before, the coordinator connected
    to the taken port and the fleet never came up: "no coordinator answers", in CI)."""
    from coordinator.dev.devfleet import DevFleet

    fleet = DevFleet(tmp_path / "fleet", agents=0)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", fleet.broker.port))
        squatter.listen()
        taken = fleet.broker.port
        async with fleet:
            assert fleet.broker.port != taken
            assert fleet.nats_url in fleet.coordinator.argv
            assert f"nats://127.0.0.1:{taken}" not in fleet.coordinator.argv


async def test_port_in_use_is_refused(tmp_path: Path) -> None:
    """A taken port is a clear BrokerError naming the port, not a hang or a crash."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} .* already in use"):
            await Broker(port=port, store_dir=tmp_path / "js").start()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A FLEETWAVE_NATS_SERVER that points nowhere is refused with the fix."""
    monkeypatch.setenv("FLEETWAVE_NATS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(BrokerError, match="not an executable file"):
        find_nats_server()


async def test_cli_broker_runs_and_stops_on_sigint(tmp_path: Path) -> None:
    """`fleetwave broker` serves clients and exits 0 on Ctrl-C."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *FLEETWAVE, "broker", "--port", str(port), "--store-dir", str(tmp_path / "js"),
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert f"127.0.0.1:{port}" in line
        bus = await Bus.connect(f"nats://127.0.0.1:{port}", "t")
        await bus.close()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_broker_port_taken_is_one_line(tmp_path: Path) -> None:
    """`fleetwave broker` on a taken port prints one line and exits 1, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        res = subprocess.run(
            [*FLEETWAVE, "broker", "--port", str(port), "--store-dir", str(tmp_path / "js")],
            capture_output=True, text=True, timeout=30, env=os.environ.copy(),
        )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "already in use" in res.stderr
    assert "Traceback" not in res.stderr
