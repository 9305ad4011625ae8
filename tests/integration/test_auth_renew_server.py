"""``fleetwave auth renew-server`` on a real secure fleet: the broker run with ``--auth``
reloads by itself and serves the new certificate to the next client (read off a TLS handshake
made as NATS clients make it: after the server's INFO), the agents keep their connections, and
a new client trusting the same CA connects."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509

from coordinator.auth.enroll import CA, SERVER
from coordinator.dev.devfleet import DevFleet
from tests.integration.procs import fleetwave, wait_until
from tests.integration.test_auth_expiry import _agent_conns

SUBNET = "127.0.91"


def _served_serial(host: str, port: int, ca: Path) -> int:
    """The serial number of the certificate the broker shows a new client now."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.settimeout(5)
        info = b""
        while not info.endswith(b"\r\n"):
            chunk = raw.recv(4096)
            assert chunk, "the broker closed before its INFO"
            info += chunk
        assert info.startswith(b"INFO ") and json.loads(info[5:])["tls_required"]
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_renewed_server_certificate_is_served_and_no_client_is_dropped(
        tmp_path: Path) -> None:
    async with DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        d = fleet.auth_dir
        assert d is not None
        url = urlparse(fleet.nats_url.split(",")[0])
        host, port = url.hostname or "127.0.0.1", url.port or 4222
        old = await asyncio.to_thread(_served_serial, host, port, d / CA)
        assert old == x509.load_pem_x509_certificate((d / SERVER).read_bytes()).serial_number
        agents = await wait_until(lambda: _agent_conns(fleet), lambda c: len(c) == 2,
                                  timeout=30, what="both agents connected")
        reloads = fleet.broker.reloads

        code, out, err = await fleetwave("auth", "renew-server", str(d))
        assert code == 0, err
        assert "renewed for" in out and "valid until" in out
        new = x509.load_pem_x509_certificate((d / SERVER).read_bytes()).serial_number
        assert new != old

        await wait_until(lambda: asyncio.sleep(0, fleet.broker.reloads), lambda r: r > reloads,
                         timeout=10, what="the broker to reload")
        served = await wait_until(lambda: asyncio.to_thread(_served_serial, host, port, d / CA),
                                  lambda s: s == new, timeout=10,
                                  what="the broker to show the new certificate")
        assert served == new
        assert await _agent_conns(fleet) == agents  # the same connections: none dropped
        code, out, err = await fleetwave(*fleet.client_args(), "nodes", "-o", "json")
        assert code == 0, err  # a new client, trusting the CA, takes the new certificate


async def test_bad_names_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    """A name no certificate can hold: exit 2, one line, the directory untouched."""
    code, _, err = await fleetwave("auth", "init", str(tmp_path / "auth"))
    assert code == 0, err
    before = (tmp_path / "auth" / SERVER).read_bytes()
    code, out, err = await fleetwave("auth", "renew-server", str(tmp_path / "auth"),
                                     "--server-name", "not a name")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "is not a host name a certificate can hold" in err, err
    assert (tmp_path / "auth" / SERVER).read_bytes() == before
