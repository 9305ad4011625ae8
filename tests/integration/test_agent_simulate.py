"""The simulated driver: many virtual nodes in one agent process, same protocol path."""

from __future__ import annotations

from pathlib import Path

from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.messages import (
    DesiredState,
    Event,
    Heartbeat,
    NodeInfo,
    ObservedState,
    Pace,
    ReleaseRef,
)
from protocol.signing import generate_seed, public_key, sign
from tests.integration.procs import reaping, spawn_agent, wait_until

N = 200
REF = ReleaseRef(service="hello", version="1.0.0", digest="sha256:" + "ab" * 32)


async def test_simulated_nodes_register_beat_and_converge(broker: Broker, tmp_path: Path) -> None:
    """Virtual nodes register and beat; a signed desired state converges; a forged one is not."""
    bus = await Bus.connect(broker.url, "default")
    try:
        await bus.ensure_fleet()
        seed = generate_seed()
        beats: set[str] = set()

        paced: set[str] = set()

        async def on_beat(subject: str, data: bytes) -> None:
            hb = decode(Heartbeat, data)
            beats.add(hb.node)
            if hb.interval == 30.0:
                paced.add(hb.node)

        await bus.subscribe(subjects.heartbeats("default"), on_beat)
        agent = spawn_agent(
            broker.url,
            "sim",
            tmp_path,
            extra=["--simulate", str(N), "--trust-key", public_key(seed)],
        )
        async with reaping(agent):
            nodes = await wait_until(
                lambda: bus.kv_entries(subjects.nodes_bucket("default")),
                lambda es: len(es) == N,
                timeout=30,
                what=f"{N} registrations",
            )
            assert all(decode(NodeInfo, e.value).simulated for e in nodes if e.value)
            await wait_until(_get(beats), lambda b: len(b) == N, timeout=20, what="heartbeats")
            # The leader's pace (published here as a coordinator would): every virtual node
            # beats at once to announce it, as a real agent does.
            await bus.publish(subjects.pace("default"),
                              encode(Pace(interval=30.0, nodes=N, rate=N / 30.0)))
            await wait_until(_get(paced), lambda b: len(b) == N, timeout=20,
                             what="every virtual node to announce the pace")

            d = DesiredState(
                fleet="default",
                node="sim-7",
                service="hello",
                generation=3,
                slots={"a": REF},
                weights={"a": 100},
            )
            key = subjects.node_service_key("sim-7", "hello")
            await bus.kv_put(subjects.desired_bucket("default"), key, encode(sign(seed, d)))
            obs_entry = await wait_until(
                lambda: bus.kv_get(subjects.observed_bucket("default"), key),
                lambda e: e is not None,
                timeout=20,
                what="observed state of sim-7",
            )
            assert obs_entry is not None and obs_entry.value is not None
            obs = decode(ObservedState, obs_entry.value)
            assert (obs.phase, obs.observed_generation, obs.weights) == ("converged", 3, {"a": 100})
            assert obs.slots["a"].status == "healthy"

            forged = DesiredState(
                fleet="default",
                node="sim-8",
                service="hello",
                generation=1,
                slots={"a": REF},
                weights={"a": 100},
            )
            key8 = subjects.node_service_key("sim-8", "hello")
            await bus.kv_put(
                subjects.desired_bucket("default"), key8, encode(sign(generate_seed(), forged))
            )

            async def refusals() -> list[Event]:
                return [
                    decode(Event, m)
                    async for m in bus.stream_messages(
                        subjects.events_stream("default"),
                        subjects.agent_events("default", "sim-8", "agent.refused"),
                    )
                ]

            refused = await wait_until(
                refusals, lambda r: len(r) == 1, timeout=20, what="agent.refused for sim-8"
            )
            assert refused[0].node == "sim-8" and "unknown key" in refused[0].message
            assert await bus.kv_get(subjects.observed_bucket("default"), key8) is None
    finally:
        await bus.close()


def _get(value):  # type: ignore[no-untyped-def]
    async def probe():  # type: ignore[no-untyped-def]
        return value

    return probe
