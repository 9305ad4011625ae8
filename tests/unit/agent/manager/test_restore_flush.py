"""agent.manager.restore: the state file is written at once, unflushed, and put on the disk
after (``flush``) only when the generations accepted changed (what must survive a power loss:
the replay floor)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.host import state as state_module
from agent.host.state import load_state
from agent.manager.service import Service
from agent.manager.shell import ServiceManager
from protocol.messages import DesiredState


def desired(generation: int) -> DesiredState:
    return DesiredState(fleet="test", node="n1", service="hello", generation=generation)


def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ServiceManager, list[int]]:
    """A manager, and every fsync of the state module (file or directory) from now on."""
    flushes: list[int] = []
    real = state_module.os.fsync
    monkeypatch.setattr(state_module.os, "fsync", lambda fd: (flushes.append(fd), real(fd)))
    return ServiceManager(fleet="test", node="n1", data_dir=tmp_path, bind_host="127.0.0.1",
                          trusted_keys=[]), flushes


async def test_only_a_change_of_the_generations_accepted_is_flushed_and_after_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    mgr, flushes = counted(tmp_path, monkeypatch)
    restorer = mgr.restorer
    svc = mgr.services["hello"] = Service(name="hello", desired=desired(3))

    def saved() -> tuple[int, int, int]:
        """(flushes so far, the file's generation, its observed generation)"""
        rec = load_state(restorer.state_path).services["hello"]
        return len(flushes), rec.generation, rec.observed_generation

    restorer.save()  # written at once, not flushed: the report that follows does not wait
    assert saved() == (0, 3, 0)
    await restorer.flush()  # then on the disk: what this process accepted was not there yet
    assert saved() == (2, 3, 0)  # the file and its directory
    svc.observed_generation = 3  # runtime state only: written, never flushed
    restorer.save()
    restorer.save_now()
    await restorer.flush()
    assert saved() == (2, 3, 3)
    svc.desired = desired(4)  # a new generation accepted: flushed after its write
    restorer.save()
    await restorer.flush()
    await restorer.flush()  # once
    assert saved() == (4, 4, 3)
    mgr.services.pop("hello")  # forgotten: flushed too
    restorer.save()
    await restorer.flush()
    assert len(flushes) == 6 and load_state(restorer.state_path).services == {}


async def test_on_the_way_out_what_is_not_on_the_disk_yet_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    mgr, flushes = counted(tmp_path, monkeypatch)
    mgr.services["hello"] = Service(name="hello", desired=desired(7))
    mgr.restorer.save()
    mgr.restorer.save_now()  # a slot's start: written, not flushed
    assert flushes == []
    mgr.restorer.save_now(flush=True)  # the agent stops
    assert len(flushes) == 2
    mgr.restorer.save_now(flush=True)  # nothing new: no flush
    assert len(flushes) == 2
    assert load_state(mgr.restorer.state_path).services["hello"].generation == 7
