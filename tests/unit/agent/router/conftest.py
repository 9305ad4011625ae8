"""The router tests' fixture: a ``Rig`` (tests.unit.agent.router.rig), torn down whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.unit.agent.router.rig import Rig, running


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """A started proxy listening on a free loopback port, with no config yet."""
    async with running() as r:
        yield r
