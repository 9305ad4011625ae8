"""A secure 3-broker cluster (``dev up --brokers 3 --secure``): brokers route to each other over
mutual TLS with the fleet's route user, a rollout works across it, and no one else joins: a
plain route, a TLS route with another fleet's certificate, and one with the right certificate
but no route password are each refused and join nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from pathlib import Path

from coordinator.auth.enroll import CA, SERVER, SERVER_KEY, AuthDir
from coordinator.dev.cluster import monitor_get
from coordinator.dev.devfleet import DevFleet
from tests.integration.e2e_support import serving
from tests.integration.procs import read_text, wait_until
from tests.integration.test_auth import _deploy, _push

SUBNET = "127.0.55"
ROUTE_CONNECT = {"echo": False, "verbose": False, "pedantic": False, "tls_required": True,
                 "name": "outsider", "cluster": "fleetwave", "headers": True}


async def _route_attempt(host: str, port: int, tls: ssl.SSLContext | None) -> bytes:
    """Dial a broker's cluster port as a route would (TLS first when ``tls``: routes speak
    nothing in the clear), send a CONNECT and a PING, and return everything the broker sent
    until it closed the connection (bounded: a route it accepted would stay open)."""
    got = b""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(host, port)
            if tls is not None:
                await writer.start_tls(tls, server_hostname=host)
            writer.write(b"CONNECT " + json.dumps(ROUTE_CONNECT).encode() + b"\r\nPING\r\n")
            await writer.drain()
            while chunk := await reader.read(4096):
                got += chunk
    except (OSError, ssl.SSLError, TimeoutError):
        pass  # refused during the handshake, or reset: what was received says enough
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return got


def _routes(port: int) -> list[str]:
    doc = monitor_get(port, "/routez")
    return sorted(str(r.get("remote_name")) for r in doc.get("routes") or [])


async def test_a_secure_cluster_rolls_out_and_refuses_outsider_routes(tmp_path: Path) -> None:
    """dev up --brokers 3 --secure forms a cluster over TLS routes and a rollout succeeds on
    it; then a plain route, a TLS route with another fleet's server certificate and a TLS
    route with this fleet's certificate but without the route password are each closed by
    the broker without a PONG (its log names why), and the cluster's routes are unchanged."""
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, secure=True,
                        brokers=3, subnet=SUBNET) as fleet:
        d = fleet.auth_dir
        assert d is not None
        await _push(fleet, "1.0.0")
        await _deploy(fleet, "1.0.0", "--batch", "100%", "--max-unavailable", "100%")
        await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"1.0.0"},
                         timeout=30, what="every node serving 1.0.0")

        target = fleet.brokers[0]
        assert target.cluster is not None
        host, port = target.cluster.listen_host, target.cluster.listen_port
        before = await asyncio.to_thread(_routes, target.monitor_port)
        assert {"fleetwave-2", "fleetwave-3"} <= set(before), before

        other = AuthDir(tmp_path / "other")
        other.init("default", (), "admin")

        def client(auth: Path) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(d / CA))
            ctx.load_cert_chain(str(auth / SERVER), str(auth / SERVER_KEY))
            return ctx

        plain = await _route_attempt(host, port, None)
        foreign = await _route_attempt(host, port, client(tmp_path / "other"))
        no_password = await _route_attempt(host, port, client(d))
        for name, got in (("plain", plain), ("foreign", foreign), ("no password", no_password)):
            assert b"PONG" not in got, (name, got)
        assert plain == b"" and foreign == b"", (plain, foreign)  # no INFO: TLS comes first
        assert b"Authorization Violation" in no_password, no_password

        assert await asyncio.to_thread(_routes, target.monitor_port) == before
        log = await read_text(target.store_dir / "nats-server.log")
        for why in ("first record does not look like a TLS handshake",  # plain
                    "certificate signed by unknown authority",  # another fleet's certificate
                    "Router connection closed: Authentication Failure"):  # no route password
            assert why in log, why
