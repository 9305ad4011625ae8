"""What the broker-kill scenarios share, on loopback (``test_cluster_kills``) and on the network
test bed (``test_net_cluster``): which broker of three a scenario kills, and the rollout record
read with a bound.

``victim(target, ...)`` names the server to kill for each of ``TARGETS``: the broker the
(leading) coordinator is connected to, JetStream's meta leader, or the leader of the rollouts
bucket's stream (``KV_fw-<fleet>-rollouts``, from its stream info). How a fleet finds the first
two (monitoring endpoints on loopback, or reached inside a bed host) is the caller's: it passes
them as functions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from protocol import subjects
from protocol.bus import Bus
from protocol.messages import RolloutRecord
from tests.integration.e2e_support import record_of

COORDINATORS_BROKER = "coordinator's broker"
META_LEADER = "meta leader"
ROLLOUTS_LEADER = "rollouts leader"
TARGETS = (COORDINATORS_BROKER, META_LEADER, ROLLOUTS_LEADER)


async def victim(target: str, bus: Bus, *, coordinators_broker: Callable[[], Awaitable[str]],
                 meta_leader: Callable[[], Awaitable[str]]) -> str:
    """The server name of the broker ``target`` (one of ``TARGETS``) names now."""
    if target == COORDINATORS_BROKER:
        name = await coordinators_broker()
        assert name, "the coordinator is connected to no broker"
        return name
    if target == META_LEADER:
        name = await meta_leader()
        assert name, "JetStream has no meta leader"
        return name
    assert target == ROLLOUTS_LEADER, target
    info = await bus.js.stream_info(subjects.kv_stream(subjects.rollouts_bucket(bus.fleet)))
    assert info.cluster is not None and info.cluster.leader, info.cluster
    return str(info.cluster.leader)


async def bounded_record(bus: Bus, rid: str, bound: float = 1.0) -> RolloutRecord:
    """The rollout record, each read bounded: a read sent to a server that just died is never
    answered, and waiting out the client's 10 s timeout would blur the figures."""
    try:
        async with asyncio.timeout(bound):
            return await record_of(bus, rid)
    except TimeoutError:
        raise AssertionError("the read of the record timed out") from None
