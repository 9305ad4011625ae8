"""agent.manager.restore: the state file is flushed to the disk when the generations accepted
change (what must survive a power loss: the replay floor), written without a flush otherwise."""

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


async def test_only_a_change_of_the_generations_accepted_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    flushes: list[int] = []
    real = state_module.os.fsync
    monkeypatch.setattr(state_module.os, "fsync", lambda fd: (flushes.append(fd), real(fd)))
    mgr = ServiceManager(fleet="test", node="n1", data_dir=tmp_path, bind_host="127.0.0.1",
                         trusted_keys=[])
    restorer = mgr.restorer
    svc = mgr.services["hello"] = Service(name="hello", desired=desired(3))

    def saved() -> tuple[int, int, int]:
        """(flushes so far, the file's generation, its observed generation)"""
        rec = load_state(restorer.state_path).services["hello"]
        return len(flushes), rec.generation, rec.observed_generation

    await restorer.save()  # the first: what this process accepted is not on the disk yet
    assert saved() == (2, 3, 0)  # the file and its directory
    svc.observed_generation = 3  # runtime state only: written, not flushed
    await restorer.save()
    restorer.save_now()
    assert saved() == (2, 3, 3)
    svc.desired = desired(4)  # a new generation accepted: flushed
    await restorer.save()
    assert saved() == (4, 4, 3)
    mgr.services.pop("hello")  # forgotten: flushed too
    await restorer.save()
    assert len(flushes) == 6 and load_state(restorer.state_path).services == {}
