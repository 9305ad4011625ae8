"""Slot processes left behind by a killed agent are found and stopped; nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.processes import find_orphans, stop_orphans

# Says it runs, then sleeps: Popen returns once the exec has begun, and until the kernel has
# laid out the new program's environment /proc reads it empty (``procs.execed``), so a search
# right after the start missed the last one started (CI once did).
SLEEP = [sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(60)"]


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def _slot(procs: list[subprocess.Popen[bytes]], cwd: Path, node: str, *,
          session: bool = True, started: Path | None = None,
          slot: str = "a") -> subprocess.Popen[bytes]:
    """A slot-like process in ``cwd``; ``started``: its FLEETWAVE_RELEASE_DIR (none: an
    older agent's process, known by its working directory)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLEETWAVE_NODE": node, "FLEETWAVE_SLOT": slot}
    if started is not None:
        env["FLEETWAVE_RELEASE_DIR"] = str(started)
    p = subprocess.Popen(SLEEP, cwd=cwd, env=env, start_new_session=session,
                         stdout=subprocess.PIPE)
    procs.append(p)
    assert p.stdout is not None and p.stdout.readline() == b"up\n"
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


def test_orphans_that_moved_away_or_live_through_a_symlink_are_found(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """A slot process that chdir'd away from its release dir is found by its
    FLEETWAVE_RELEASE_DIR; a data dir reached through a symlink is searched as the kernel
    resolves it (both were missed: such an orphan ran on unwatched beside its new slot)."""
    real = tmp_path / "disk" / "node-1"
    (real / "releases").mkdir(parents=True)
    link = tmp_path / "data"
    link.symlink_to(real)
    releases = link / "releases"
    moved = _slot(spawned, tmp_path / "elsewhere", "node-1", started=releases / "abc")
    stayed = _slot(spawned, releases / "abc", "node-1", started=releases / "abc")
    older = _slot(spawned, releases / "def", "node-1")  # no FLEETWAVE_RELEASE_DIR: by its cwd
    _slot(spawned, tmp_path / "elsewhere", "node-1", started=tmp_path / "other" / "abc")
    _slot(spawned, tmp_path / "elsewhere", "node-1")  # nothing says it was started here
    found = find_orphans(releases, "node-1", keep=set())
    assert sorted(p.pid for p in found) == sorted([moved.pid, stayed.pid, older.pid])


def test_a_daemon_an_adopted_slot_started_is_no_orphan(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """A session leader with an adopted slot's release and slot in its environment is a helper
    that slot's process started (a daemon of its own: setsid, chdir /), not an orphan: a
    review found such helpers killed at every agent restart. The same release's other slot is
    still an orphan."""
    releases = tmp_path / "node-1" / "releases"
    adopted = _slot(spawned, releases / "abc", "node-1", started=releases / "abc")
    helper = _slot(spawned, tmp_path / "elsewhere", "node-1", started=releases / "abc")
    other = _slot(spawned, tmp_path / "elsewhere", "node-1", started=releases / "abc", slot="b")
    found = find_orphans(releases, "node-1", keep={adopted.pid},
                         kept_slots=[(releases / "abc", "a")])
    assert [p.pid for p in found] == [other.pid], f"the other slot's exit: {other.poll()}"
    assert helper.pid not in {p.pid for p in found}
