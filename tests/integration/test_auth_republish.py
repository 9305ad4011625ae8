"""An operator cannot make the server publish for it: a stream it would create with a
``republish`` onto the fleet's subjects (a node's heartbeat, the coordinator's events) is
refused, and nothing reaches the coordinator. Before, the server created it and republished an
operator's message as node-1's heartbeat. Real nats-server with the permissions ``fleetwave
auth`` writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.errors
import pytest
from nats.js import api as js_api

from coordinator.auth.enroll import CA, COORDINATOR, AuthDir
from coordinator.dev.broker import Broker
from protocol import creds as creds_file
from protocol.bus import Bus

FLEET = "default"
HEARD_WAIT = 2.0  # how long the coordinator listens for a forged message


@pytest.mark.parametrize("dest", [f"fw.{FLEET}.hb.node-1", f"fw.{FLEET}.evt.node.forgotten"])
async def test_an_operators_stream_cannot_republish_onto_the_fleets_subjects(
        tmp_path: Path, dest: str) -> None:
    auth = AuthDir(tmp_path / "auth")
    await asyncio.to_thread(auth.init, FLEET, (), "ops")
    broker = Broker(store_dir=tmp_path / "js", auth=auth.path)
    await broker.start()
    try:
        tls = str(auth.path / CA)
        coord = await Bus.connect(broker.url, FLEET, name="test-coordinator", tls_ca=tls,
                                  creds=creds_file.load(auth.creds_path("coordinator",
                                                                        COORDINATOR)))
        ops = await Bus.connect(broker.url, FLEET, name="test-operator", tls_ca=tls,
                                creds=creds_file.load(auth.creds_path("operator", "ops")))
        try:
            heard: list[str] = []
            got = asyncio.Event()

            async def on(subject: str, data: bytes) -> None:
                heard.append(subject)
                got.set()

            await coord.subscribe(dest, on)
            await coord.flush()
            mine = f"fw.{FLEET}.api.ops.evil"  # a subject the operator may publish on
            evil = js_api.StreamConfig(name="EVIL", subjects=[mine],
                                       storage=js_api.StorageType.MEMORY,
                                       republish=js_api.RePublish(src=mine, dest=dest))
            with pytest.raises((TimeoutError, nats.errors.Error)):  # refused: no answer
                await asyncio.wait_for(ops.js.add_stream(evil), 5)
            await ops.nc.publish(mine, b'{"node": "node-1"}')
            await ops.nc.flush()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(got.wait(), HEARD_WAIT)
            assert heard == []
        finally:
            await ops.close()
            await coord.close()
    finally:
        await broker.stop()
