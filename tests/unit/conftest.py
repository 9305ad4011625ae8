"""Fixtures every unit test may take: the fakes of ``protocol.testing`` (the testing kit)."""

from __future__ import annotations

import pytest

from protocol.testing import FakeBus, FakeClock


@pytest.fixture
def fake_bus() -> FakeBus:
    """An empty in-memory bus of fleet ``f``."""
    return FakeBus()


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock at t=1000 that moves only when the test moves it."""
    return FakeClock()
