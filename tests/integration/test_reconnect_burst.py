"""A burst of the agents' reconnects, heard by a leader whose own connection held (as when a
server of its cluster dies): its rollouts are excused as from a reconnect of its own
(``coordinator.core.reconnects``, ``Runner.excused_until``). Real nats-server, coordinator and
agent (``--simulate``: 60 nodes whose process is killed and started again, so that they all
register again at once) on 127.0.78.x: the leader logs the excuse, and its pace says the burst
(``Pace.burst``: agents that start at once spread their first watches by it) and its end. The
excuse's effect on deadlines is tested in virtual time
(``tests/unit/coordinator/runtime/test_runner.py``), an agent's wait for the pace in
``tests/unit/agent/manager/test_desired.py``, the spread first watch in ``test_bus.py``."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from protocol.messages import DeployRequest, Pace, RolloutRecord, RolloutSpec
from tests.integration.e2e_support import record_of
from tests.integration.procs import wait_until
from tests.integration.test_record_split import api, simulated

N = 60
SUBNET = "127.0.78"
BURST = re.compile(r"(\d+) nodes registered again at once")


async def test_agents_registering_again_at_once_excuse_the_leaders_rollouts(
        tmp_path: Path) -> None:
    paces: list[Pace] = []  # every pace the leader published, from before it started
    async with simulated(tmp_path, N, "1MB", subnet=SUBNET, paces=paces) as (
            _broker, bus, _c, agent, _k):
        spec = RolloutSpec(service="hello", version="1.0.0", batch="100%",
                           max_unavailable="100%", bake=120.0, progress_deadline=120.0)
        rid = str((await api(bus, "deploy", DeployRequest(spec=spec)))["id"])

        def baking(r: RolloutRecord) -> bool:
            return r.waves[0].state == "baking"

        await wait_until(lambda: record_of(bus, rid), baking, timeout=60,
                         what="the rollout's wave to bake")
        # The agent's first registrations are a burst too when the leader hears them (its
        # start overtook the agent's): the restart's, within one window of them, would be that
        # burst's tail, excused already and not logged again (``core.reconnects``). Restart
        # it once the leader says that burst is over, if it heard one.
        await wait_until(lambda: asyncio.sleep(0, paces), lambda ps: not ps or not ps[-1].burst,
                         timeout=60, what="the first registrations' burst to be over",
                         interval=0.5)
        first = len(paces)
        log = tmp_path / "logs" / "coordinator.log"
        before = len(log.read_text())
        await agent.kill()  # SIGTERM then SIGKILL, reaped
        await agent.start()  # its 60 nodes register again within a moment
        # ...and the leader's pace says so at once, for agents that wait for it before their
        # first watch (``Pace.burst``); then, the burst over, that it is over.
        await wait_until(lambda: asyncio.sleep(0, paces[first:]),
                         lambda ps: any(p.burst for p in ps),
                         timeout=30, what="a pace that says a burst is under way")
        await wait_until(lambda: asyncio.sleep(0, paces), lambda ps: not ps[-1].burst,
                         timeout=60, what="a pace that says the burst is over", interval=0.5)

        async def since() -> str:
            return log.read_text()[before:]

        text = await wait_until(since, lambda t: BURST.search(t) is not None, timeout=60,
                                what="the leader to excuse its rollout after the burst")
        found = BURST.search(text)
        assert found is not None and 20 <= int(found.group(1)) <= N, text
        assert "progress deadline passes before" in text, text
        assert (await record_of(bus, rid)).state == "running"
