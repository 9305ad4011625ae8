"""Chaos fixtures: the integration ones (a real nats-server that a test may kill and restart),
``netbed`` (hosts in network namespaces, see ``tests.netbed``), and the ``integration`` marker
on every chaos test, since each starts real processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest

from tests.integration.conftest import broker, reaped
from tests.netbed import NetBed

__all__ = ["broker", "netbed", "reaped"]


@pytest.fixture
def netbed() -> Iterator[Callable[[Sequence[str]], NetBed]]:
    """A factory ``netbed(hosts) -> NetBed`` (set up); every bed it made is torn down at the end
    of the test, also when it fails or is interrupted."""
    beds: list[NetBed] = []

    def make(hosts: Sequence[str]) -> NetBed:
        bed = NetBed(hosts)
        beds.append(bed)
        bed.setup()
        return bed

    yield make
    errors = []
    for bed in reversed(beds):
        try:
            bed.teardown()
        except Exception as exc:  # every bed is torn down; the first failure is reported
            errors.append(exc)
    if errors:
        raise errors[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
