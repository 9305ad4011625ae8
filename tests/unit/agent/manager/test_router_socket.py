"""``router_socket``: a router's control socket stays under the agent's data dir whenever a
path there fits a unix socket (the agent's systemd unit has ``PrivateTmp=yes``: a temp dir that
systemd empties when the agent stops, while its routers run on); the temp dir only for a data
dir too deep for any; a router an older agent put in the temp dir is found where it is."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.manager.routing import router_socket
from agent.router.control import MAX_SOCKET_PATH

LONG = "s" * 64  # the longest service name there is (``protocol.subjects.check_name``)


def _data_dir(length: int) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="fw-"))
    path = base / ("d" * (length - len(str(base)) - 1))
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """/var/lib/fleetwave/agent's length: a 64-character name does not fit there as itself."""
    yield from _data_dir(len("/var/lib/fleetwave/agent"))


@pytest.fixture
def deeper() -> Iterator[Path]:
    """40 bytes: a 55-character name fits in the temp dir as itself, not under the data dir."""
    yield from _data_dir(40)


def _fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH


def test_a_short_name_keeps_its_readable_path(data_dir: Path) -> None:
    assert router_socket(data_dir, "hello") == data_dir / "run" / "router-hello.sock"


def test_a_long_name_stays_under_the_data_dir_hashed(data_dir: Path) -> None:
    """A 64-character name with the default data dir's length: under the data dir, its name
    hashed (it went to the temp dir before, which PrivateTmp empties at the agent's stop)."""
    assert not _fits(data_dir / "run" / f"router-{LONG}.sock")
    path = router_socket(data_dir, LONG)
    digest = hashlib.sha256(LONG.encode()).hexdigest()[:16]
    assert path == data_dir / "run" / f"router-{digest}.sock" and _fits(path)
    assert router_socket(data_dir, LONG) == path  # the same at every call: found again


def test_a_router_an_older_agent_put_in_the_temp_dir_is_found_there(deeper: Path) -> None:
    data_dir, name = deeper, "s" * 55
    tag = hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()[:16]
    older = Path(tempfile.gettempdir()) / f"fleetwave-{tag}" / f"router-{name}.sock"
    assert _fits(older) and not _fits(data_dir / "run" / f"router-{name}.sock")
    assert router_socket(data_dir, name).parent == data_dir / "run"
    older.parent.mkdir(mode=0o700)
    try:
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(str(older))
            assert router_socket(data_dir, name) == older
        older.unlink()
        assert router_socket(data_dir, name).parent == data_dir / "run"  # gone: the new place
    finally:
        older.unlink(missing_ok=True)
        older.parent.rmdir()


def test_a_data_dir_too_deep_for_any_path_uses_the_temp_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    path = router_socket(deep, "hello")
    assert not path.is_relative_to(deep) and _fits(path)
    assert path.parent.name.startswith("fleetwave-")
