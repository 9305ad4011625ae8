"""agent.manager.restore: the state file holds the newest snapshot, and the flush that puts it on
the disk counts only for what it found there."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.host.releases import ReleaseCache
from agent.host.state import load_state
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
