"""agent.manager.restore: the state file holds the newest snapshot, whichever write ends last."""

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
from agent.manager.service import NodeConfig, Services


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


async def test_an_older_snapshot_never_lands_over_a_newer_one(tmp_path: Path) -> None:
    """save() snapshots first but its worker thread writes last: the file keeps save_now()'s
    newer snapshot (made when a slot started), not save()'s older one."""
    size = 1
    restorer = _restorer(tmp_path, lambda: size)
    held = HeldExecutor()
    asyncio.get_running_loop().set_default_executor(held)
    saving = asyncio.create_task(restorer.save())
    await asyncio.sleep(0)  # one step of save(): the snapshot, then the write handed to a thread
    assert held.submitted == 1 and not saving.done()
    size = 2
    restorer.save_now()
    held.go.set()
    await asyncio.wait_for(saving, 10)
    assert load_state(restorer.state_path).fleet_nodes == 2
    held.shutdown(wait=True)
