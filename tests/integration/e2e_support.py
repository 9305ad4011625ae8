"""Helpers shared by the end-to-end tests (a DevFleet, the real CLI, real traffic).

- ``push(url, *versions)``: ``fleetwave release push`` of example hello bundles.
- ``status(url, rid)``: ``fleetwave status RID -o json`` as a dict ("" for the latest).
- ``serving(fleet)``: what each node's router answers now, by node id.
- ``service_pids(fleet)``: the service processes the fleet's agents run now, found with psutil
  (not from what the agents say), as {pid: (node, slot, version)}.
- ``loaded(fleet)``: steady checked traffic (``coordinator.traffic.Traffic``) through every
  node's router while the block runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

from coordinator.devfleet import DevFleet
from coordinator.traffic import Traffic, probe_version
from tests.integration.procs import fleetwave

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "hello"
PORT = 8080
DEPLOY_TIMEOUT = 100.0


async def push(url: str, *versions: str) -> None:
    """Push the example hello bundles ``versions`` to the fleet's release store."""
    for v in versions:
        code, _, err = await fleetwave("release", "push", str(EXAMPLES / v), nats_url=url)
        assert code == 0, f"release push {v} failed ({code}): {err}"


async def status(url: str, rid: str = "") -> dict[str, Any]:
    """``fleetwave status [RID] -o json``; fails the test on a CLI error."""
    code, out, err = await fleetwave("status", *([rid] if rid else []), "-o", "json",
                                     nats_url=url)
    assert code == 0, f"fleetwave status failed ({code}): {err}"
    doc: dict[str, Any] = json.loads(out)
    return doc


async def events_of(url: str, rid: str) -> list[dict[str, Any]]:
    """The events of one rollout, oldest first."""
    code, out, err = await fleetwave("events", "--rollout", rid, "-o", "json", nats_url=url)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def serving(fleet: DevFleet) -> dict[str, str]:
    """What each node's router answers now: a version, or ``<why not>``."""
    answers = await asyncio.gather(
        *(probe_version(fleet.host(i), PORT) for i in range(1, len(fleet.agents) + 1))
    )
    return {f"node-{i}": v for i, v in enumerate(answers, start=1)}


def _service_pids(root: str) -> dict[int, tuple[str, str, str]]:
    found: dict[int, tuple[str, str, str]] = {}
    for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
        cwd = proc.info.get("cwd") or ""
        argv = proc.info.get("cmdline") or []
        if not cwd.startswith(root) or "app.py" not in argv or "--smoke" in argv:
            continue
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[proc.pid] = (env.get("FLEETWAVE_NODE", "?"), env.get("FLEETWAVE_SLOT", "?"),
                               env.get("FLEETWAVE_VERSION", "?"))
    return found


async def service_pids(fleet: DevFleet) -> dict[int, tuple[str, str, str]]:
    """The live service processes under the fleet's directory: {pid: (node, slot, version)}."""
    return await asyncio.to_thread(_service_pids, str(fleet.dir))


@contextlib.asynccontextmanager
async def loaded(fleet: DevFleet, *, rate: float = 20.0) -> AsyncIterator[Traffic]:
    """Steady GET traffic to every node's router (2 workers each) while the block runs."""
    traffic = Traffic([(fleet.host(i), PORT) for i in range(1, len(fleet.agents) + 1)],
                      workers_per_target=2, rate=rate)
    traffic.start()
    try:
        yield traffic
    finally:
        await traffic.stop()
