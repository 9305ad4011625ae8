"""End to end: a release pushed is fetched by the agents that run its service before it is
deployed (``agent.manager.prefetch``, told by the leader: ``coordinator.runtime.released``).

- On an open dev fleet of 3 real agents (node-3 started with ``--prefetch off``), hello 1.0.0
  runs on node-1 and node-3 (``--selector zone=a``), not on node-2. ``fleetwave release push``
  of 2.0.0: node-1 has it unpacked in its cache before any deploy; node-2 (not running hello)
  and node-3 (off) have not. The deploy of 2.0.0 then starts node-1's new slot in that very
  directory (same inode: not fetched and unpacked again).
- On a secure fleet (TLS, each process its own credentials, the fleet in three accounts), the
  operator's push reaches the leader and the leader's word reaches the node: the subjects are
  exported, imported and allowed where they must be, and nothing else is.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import psutil

from coordinator.dev.broker import free_port
from coordinator.dev.devfleet import DevFleet
from protocol.bundle import digest, pack
from tests.integration.e2e_support import DEPLOY_TIMEOUT, serving
from tests.integration.procs import fleetwave, hello_bundle, read_text, wait_until

SUBNET = "127.0.42"
NOT_FETCHED_WAIT = 1.0  # after node-1 fetched: the others heard the same notice as long ago


def cached(fleet: DevFleet, node: str, version: str) -> Path:
    """Where ``node``'s cache keeps the hello ``version`` bundle unpacked (if it has it)."""
    data, _ = pack(hello_bundle(version))
    return fleet.dir / node / "releases" / digest(data).removeprefix("sha256:")


async def cli(fleet: DevFleet, *args: str) -> str:
    code, out, err = await fleetwave(*fleet.client_args(), *args, timeout=DEPLOY_TIMEOUT)
    assert code == 0, f"fleetwave {' '.join(args)} failed ({code}): {out}{err}"
    return out


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def slot_dirs(node_dir: Path, version: str) -> set[Path]:
    """The working directories of the hello ``version`` processes the agent of ``node_dir``
    started (found by their environment)."""
    out = set()
    for p in psutil.process_iter(["environ", "cwd"]):
        env = p.info.get("environ") or {}
        cwd = p.info.get("cwd")
        if env.get("FLEETWAVE_VERSION") == version and cwd and cwd.startswith(str(node_dir)):
            out.add(Path(cwd))
    return out


async def test_a_pushed_release_is_fetched_by_the_nodes_that_run_it_before_its_deploy(
    tmp_path: Path,
) -> None:
    fleet = DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5, subnet=SUBNET)
    fleet.agents[2].argv += ["--prefetch", "off"]  # node-3
    metrics = (fleet.host(1), free_port(fleet.host(1)))
    fleet.agents[0].argv += ["--metrics", f"{metrics[0]}:{metrics[1]}"]  # node-1
    async with fleet:
        zone_a = ("--selector", "zone=a")  # node-1 and node-3 (DevFleet.labels)
        await cli(fleet, "release", "push", str(hello_bundle("1.0.0")))
        await cli(fleet, "deploy", "hello", "1.0.0", *zone_a, "--batch", "100%",
                  "--max-unavailable", "100%")
        await cli(fleet, "release", "push", str(hello_bundle("2.0.0")))
        ahead = cached(fleet, "node-1", "2.0.0")
        await wait_until(lambda: asyncio.to_thread(ahead.is_dir), bool, timeout=15,
                         what="node-1 to fetch 2.0.0 once pushed")
        inode = ahead.stat().st_ino
        await asyncio.sleep(NOT_FETCHED_WAIT)
        assert not cached(fleet, "node-2", "2.0.0").exists(), "node-2 does not run hello"
        assert not cached(fleet, "node-3", "2.0.0").exists(), "node-3 runs with --prefetch off"
        assert not slot_dirs(fleet.dir / "node-1", "2.0.0"), "nothing runs 2.0.0 before its deploy"
        log = (fleet.dir / "logs" / "node-1.log").read_text()
        assert "fetched hello 2.0.0 ahead of its deploy" in log, log[-2000:]
        scraped = await asyncio.to_thread(scrape, *metrics)
        assert 'fleetwave_agent_prefetches_total{outcome="fetched"} 1.0' in scraped, scraped

        await cli(fleet, "deploy", "hello", "2.0.0", *zone_a, "--batch", "1", "--bake", "0")
        answers = await serving(fleet)
        assert answers["node-1"] == answers["node-3"] == "2.0.0", answers
        assert slot_dirs(fleet.dir / "node-1", "2.0.0") == {ahead}
        assert ahead.stat().st_ino == inode  # the very directory fetched ahead
        assert cached(fleet, "node-3", "2.0.0").is_dir()  # fetched by its deploy


async def test_on_a_secure_fleet_the_leaders_word_of_a_push_reaches_the_nodes(
    tmp_path: Path,
) -> None:
    async with DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5, secure=True,
                        subnet=SUBNET) as fleet:
        await cli(fleet, "release", "push", str(hello_bundle("1.0.0")))
        await cli(fleet, "deploy", "hello", "1.0.0", "--batch", "100%")
        await cli(fleet, "release", "push", str(hello_bundle("2.0.0")))
        ahead = cached(fleet, "node-1", "2.0.0")
        await wait_until(lambda: asyncio.to_thread(ahead.is_dir), bool, timeout=15,
                         what="node-1 to fetch 2.0.0 once pushed, on a secure fleet")
        log = await read_text(fleet.broker.store_dir / "nats-server.log")
        assert "Violation" not in log, log[-2000:]
