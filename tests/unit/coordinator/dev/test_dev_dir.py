"""A dev fleet's directory: one fleet at a time (``DevFleet.hold``), and its reaper takes only a
fleet's own processes from it (``reap_leftovers(ours_only=True)``): a review's second
``fleetwave dev up`` in one directory, failing to start, reaped the first fleet and a ``sleep``
of its user's that merely worked there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from coordinator.dev.devfleet import DevFleet, reap_leftovers
from coordinator.errors import UsageError


async def test_a_second_fleet_in_one_directory_is_refused_before_it_does_anything(
        tmp_path: Path) -> None:
    first = DevFleet(tmp_path / "dev", agents=0)
    first.hold()
    try:
        second = DevFleet(tmp_path / "dev", agents=0)
        with pytest.raises(UsageError, match="another dev fleet runs in"):
            await second.__aenter__()
    finally:
        await first.stop()
    again = DevFleet(tmp_path / "dev", agents=0)
    again.hold()  # free once the first stopped
    await again.stop()


def test_the_dev_fleets_reaper_takes_only_a_fleets_own_processes(tmp_path: Path) -> None:
    work = tmp_path / "dev" / "node-1"
    work.mkdir(parents=True)
    code = "import time; time.sleep(60)"
    mine = subprocess.Popen([sys.executable, "-c", code], cwd=work)  # the user's, not ours
    env = {**os.environ, "FLEETWAVE_NODE": "node-1", "FLEETWAVE_SLOT": "a"}
    service = subprocess.Popen([sys.executable, "-c", code], cwd=work, env=env)  # an agent's
    try:
        assert reap_leftovers(tmp_path / "dev", exclude=set(), timeout=5, ours_only=True) == 1
        assert service.wait(10) is not None
        assert mine.poll() is None and psutil.pid_exists(mine.pid)
        # Without ours_only (the tests' own reaper) everything under the directory goes.
        assert reap_leftovers(tmp_path / "dev", exclude=set(), timeout=5) == 1
        assert mine.wait(10) is not None
    finally:
        for p in (mine, service):
            p.kill()
            p.wait()
