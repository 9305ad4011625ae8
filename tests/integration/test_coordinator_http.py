"""`fleetwave coordinator --http`: /healthz and /readyz of a real coordinator; bad input."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

from coordinator.dev.broker import Broker, free_port
from tests.integration.procs import fleetwave, reaping, spawn_coordinator, wait_until


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def get(url: str) -> tuple[int, dict[str, object]]:
    return await asyncio.to_thread(_get, url)


async def test_healthz_answers_before_the_bus_and_readyz_once_set_up(tmp_path: Path) -> None:
    """Liveness answers while no broker runs; readiness is 503 with a reason until the coordinator
    is set up, then 200 naming it the leader."""
    port, http = free_port(), free_port()
    base = f"http://127.0.0.1:{http}"
    coord = spawn_coordinator(f"nats://127.0.0.1:{port}", tmp_path,
                              extra=["coordinator", "--http", f"127.0.0.1:{http}"])
    async with reaping(coord):
        status, body = await wait_until(lambda: get(f"{base}/healthz"), lambda r: r[0] == 200,
                                        timeout=15, what="/healthz")
        assert body == {"ok": True}
        status, body = await get(f"{base}/readyz")
        assert status == 503 and body["ready"] is False and "bus" in str(body["reason"])
        broker = Broker(store_dir=tmp_path / "js", port=port)
        await broker.start()
        try:
            status, body = await wait_until(lambda: get(f"{base}/readyz"),
                                            lambda r: r[0] == 200 and r[1]["role"] == "leader",
                                            timeout=30, what="/readyz as leader")
            assert body["fleet"] == "default" and body["ready"] is True
        finally:
            await broker.stop()


async def test_http_address_in_use_or_malformed_is_one_line_exit_2(tmp_path: Path) -> None:
    """An --http address another process holds, or one that is not HOST:PORT: exit 2, one line,
    no traceback, before anything connects."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, _, err = await fleetwave("--nats", "nats://127.0.0.1:1", "coordinator",
                                       "--key-file", str(tmp_path / "k.seed"),
                                       "--http", f"127.0.0.1:{port}")
    assert code == 2, err
    assert f"--http 127.0.0.1:{port}: cannot listen (address already in use)" in err
    assert "Traceback" not in err
    code, _, err = await fleetwave("coordinator", "--http", "localhost")
    assert code == 2 and "Traceback" not in err
    assert "'localhost' is not HOST:PORT" in err
