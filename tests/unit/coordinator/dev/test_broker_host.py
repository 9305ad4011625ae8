"""``fleetwave broker``'s --host and --name are checked before anything is created, and a bind
that fails for another reason than a taken port says that reason (``broker.check_host``,
``broker.port_in_use``, ``cluster.check_server_name``)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.dev.broker import Broker, port_in_use
from coordinator.dev.cluster import cluster_spec
from coordinator.errors import UsageError


def test_a_host_that_is_no_address_nor_name_is_a_usage_error(tmp_path: Path) -> None:
    """'not a host' is refused as such (not as a port in use), and no store is made."""
    b = Broker(port=14999, host="not a host", store_dir=tmp_path / "s")
    with pytest.raises(UsageError, match="neither an IP address nor a host name"):
        asyncio.run(b.start())
    assert not (tmp_path / "s").exists()


def test_an_address_of_another_host_says_why_it_cannot_be_bound() -> None:
    """1.2.3.4 is not this host's: the kernel's reason, not "already in use"."""
    with pytest.raises(UsageError) as info:
        port_in_use("1.2.3.4", 14999)
    assert "cannot listen on 1.2.3.4 port 14999: " in str(info.value)
    assert "in use" not in str(info.value)


def test_a_port_past_65535_is_a_usage_error() -> None:
    """No OverflowError (a traceback) from the bind check."""
    with pytest.raises(UsageError, match="port 65537 is out of range"):
        port_in_use("127.0.0.1", 65537)


def test_a_taken_port_is_in_use_and_a_free_one_is_not() -> None:
    """EADDRINUSE alone means "in use"."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_an_ipv6_loopback_is_bound_as_ipv6() -> None:
    """::1 is checked with an IPv6 socket, not refused as a port in use."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    assert not port_in_use("::1", port)
    assert Broker(port=port, host="::1").url == f"nats://[::1]:{port}"


@pytest.mark.parametrize("name", ["a b", 'a"b', "", "-x", "x" * 65])
def test_a_name_no_server_can_have_is_refused_before_the_conf(name: str) -> None:
    """--name is checked with the cluster flags, before any file is written."""
    with pytest.raises(UsageError, match="cannot name a server"):
        cluster_spec(name, "127.0.0.1:16222", None)


def test_broker_with_a_bad_name_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``broker --name 'a b' --cluster-listen ...``: one line, exit 2, no store dir."""
    with pytest.raises(SystemExit) as info:
        main(["broker", "--name", "a b", "--cluster-listen", "127.0.0.1:16222",
              "--store-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_good_names_pass() -> None:
    """The names the dev cluster and the docs use."""
    spec = cluster_spec("fleetwave-1", "127.0.0.1:16222", None)
    assert spec is not None and spec.name == "fleetwave-1"
    assert cluster_spec("b.1_x", None, None) is None
