"""agent.manager.restore: the state file holds the newest snapshot, and the flush that puts it on
the disk counts only for what it found there; a slot record that names no possible process is
skipped."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.host.releases import ReleaseCache
from agent.host.state import AgentState, ServiceRecord, SlotRecord, load_state, save_state
from agent.manager.restore import Restorer
from agent.manager.routing import RouterLink
from agent.manager.service import NodeConfig, Service, Services


class HeldExecutor(ThreadPoolExecutor):
    """A worker thread slow to start: what is submitted runs only once ``go`` is set."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.go = threading.Event()
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1

        def held() -> Any:
            if not self.go.wait(10):
                raise TimeoutError("the test never let the write go")
            return fn(*args, **kwargs)

        return super().submit(held)


def _restorer(tmp_path: Path, fleet_nodes: Callable[[], int]) -> Restorer:
    config = NodeConfig(fleet="default", node="n1", data_dir=tmp_path, bind_host="127.0.0.1",
                        trusted_keys=frozenset())
    services: Services = {}
    return Restorer(config, services, ReleaseCache(tmp_path / "releases"),
                    RouterLink(config, services, asyncio.Event()), fleet_nodes=fleet_nodes)


async def test_a_flush_under_way_when_a_newer_file_is_written_is_followed_by_another(
    tmp_path: Path,
) -> None:
    """The flush runs in a worker thread while the loop goes on: a newer state file renamed in
    meanwhile (save_now, when a slot started) may come after the flush opened the older one,
    so that flush does not count for the newer one's generations: another follows. Every
    write is the loop's own, in order: the file is the newest snapshot."""
    size = 1
    restorer = _restorer(tmp_path, lambda: size)
    restorer.services["hello"] = Service(name="hello", floor=4)
    held = HeldExecutor()
    asyncio.get_running_loop().set_default_executor(held)
    restorer.save()
    flushing = asyncio.create_task(restorer.flush())
    await asyncio.sleep(0)  # the flush handed to a thread, held there
    assert held.submitted == 1 and not flushing.done()
    size = 2
    restorer.save_now()
    held.go.set()
    await asyncio.wait_for(flushing, 10)
    assert load_state(restorer.state_path).fleet_nodes == 2
    await asyncio.wait_for(restorer.flush(), 10)
    assert held.submitted == 2  # the newer file's flush
    await asyncio.wait_for(restorer.flush(), 10)
    assert held.submitted == 2  # and nothing more
    held.shutdown(wait=True)


MANIFEST = 'name = "hello"\nversion = "1.0.0"\ncommand = ["sleep", "60"]\nport = 8080\n'
DIGEST = "sha256:" + "ab" * 32


def _state_with_slot(tmp_path: Path, **record: Any) -> None:
    """A state file of node n1 whose service hello has slot a as ``record`` says, its release
    (a manifest) unpacked in the cache."""
    release = tmp_path / "releases" / DIGEST.removeprefix("sha256:")
    release.mkdir(parents=True)
    (release / "fleetwave.toml").write_text(MANIFEST)
    slot = SlotRecord(slot="a", status="healthy", digest=DIGEST, version="1.0.0", **record)
    save_state(tmp_path / "state.json", AgentState(node="n1", fleet="default", services={
        "hello": ServiceRecord(service="hello", slots={"a": slot})}))


@pytest.mark.parametrize(("record", "said"), [
    ({"pid": -1, "port": 8081}, "pid -1 is not a process id"),
    ({"pid": 0, "port": 8081}, "pid 0 is not a process id"),
    ({"port": 70000}, "port 70000 is not a TCP port"),
    ({"port": 0}, "port 0 is not a TCP port"),
])
async def test_a_slot_record_naming_no_possible_process_is_skipped_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, record: dict[str, int], said: str
) -> None:
    """A slot record whose pid is 0 or less or whose port is no TCP port (a damaged state file
    that still decodes) is not adopted: one line says why, the slot counts as gone and the
    agent starts. A review found pid -1 raised ValueError out of the restore at every start."""
    record.setdefault("pid", os.getpid())  # a live pid: only the port is wrong
    _state_with_slot(tmp_path, create_time=psutil.Process().create_time(), **record)
    restorer = _restorer(tmp_path, lambda: 0)
    with caplog.at_level(logging.WARNING, "fleetwave.agent.services"):
        adopted = await restorer.restore(lambda runner, kind, message: None)
    assert adopted == [] and restorer.services["hello"].runners == {}
    assert [r.getMessage() for r in caplog.records] == [
        f"slot hello/a of the state file is skipped: {said}; it will be started again"]
