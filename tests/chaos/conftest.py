"""Chaos fixtures: the integration ones (a real nats-server that a test may kill and restart),
and the ``integration`` marker on every chaos test, since each starts real processes."""

from __future__ import annotations

import pytest

from tests.integration.conftest import broker

__all__ = ["broker"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
