"""Slot processes left behind by a killed agent are found and stopped; nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.processes import find_orphans, stop_orphans

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _slot(procs: list[subprocess.Popen[bytes]], cwd: Path, node: str, *,
          session: bool = True) -> subprocess.Popen[bytes]:
    cwd.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(SLEEP, cwd=cwd, env={**os.environ, "FLEETWAVE_NODE": node},
                         start_new_session=session)
    procs.append(p)
    return p


def test_only_unaccounted_slots_of_this_node_are_orphans(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """A session leader in our releases dir with our node id is an orphan unless kept."""
    releases = tmp_path / "node-1" / "releases"
    orphan = _slot(spawned, releases / "abc", "node-1")
    kept = _slot(spawned, releases / "abc", "node-1")
    _slot(spawned, releases / "abc", "node-2")  # another node's, sharing nothing but the host
    _slot(spawned, tmp_path / "node-2" / "releases" / "abc", "node-1")  # another agent's dir
    _slot(spawned, releases / "abc", "node-1", session=False)  # a hook: not a session leader
    found = find_orphans(releases, "node-1", keep={kept.pid})
    assert [p.pid for p in found] == [orphan.pid]
    stop_orphans(found, timeout=5)
    assert orphan.wait(timeout=5) is not None
    assert kept.poll() is None
