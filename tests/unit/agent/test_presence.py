"""Registration and heartbeat messages, labels, and the heartbeat and retry schedules."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from agent import __version__, presence
from agent.host.hostinfo import HostFacts, HostFigures, HostSampler, host_facts
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import FEATURE_BATCH, Heartbeat, NodeInfo, Pace, ServiceSummary, SlotProcess

FACTS = HostFacts(
    hostname="h1", platform="Linux-6", python="3.11.7", cpu_count=4, mem_total=8 << 30,
    boot_time=1_600_000_000.0,
)
FIGURES = HostFigures(
    cpu_percent=12.0, mem_percent=34.0, disk_percent=56.0, load1=0.5, agent_rss=40 << 20,
    agent_cpu_percent=1.5,
)


def test_parse_labels() -> None:
    """Repeated key=value flags become a dict."""
    assert presence.parse_labels(["zone=a", "role=web", "k8s.io/x=1.2"]) == {
        "zone": "a", "role": "web", "k8s.io/x": "1.2",
    }
    assert presence.parse_labels([]) == {}


@pytest.mark.parametrize("bad", ["zone", "=a", "zone=", "zone=a b", "zone=a,b", "-x=1"])
def test_parse_labels_refuses_malformed(bad: str) -> None:
    """A label that is not key=value in the selector grammar is refused, naming it."""
    with pytest.raises(ProtocolError, match="not key=value"):
        presence.parse_labels([bad])


def test_parse_labels_refuses_a_key_twice() -> None:
    """Two values for one key is a mistake, not a last-one-wins."""
    with pytest.raises(ProtocolError, match="twice"):
        presence.parse_labels(["zone=a", "zone=b"])


@pytest.mark.parametrize("seconds", [0.0, 0.01, 301.0, -1.0])
def test_check_interval_refuses_out_of_range(seconds: float) -> None:
    """Intervals the coordinator would clamp are refused at the flag instead."""
    with pytest.raises(ProtocolError, match="out of range"):
        presence.check_interval(seconds)


def test_node_info_carries_identity_and_host_facts() -> None:
    """NodeInfo holds the id, labels, agent version and host facts, and survives the wire."""
    info = presence.node_info(
        node="n1", labels={"zone": "a"}, facts=FACTS, bind_host="127.0.1.1", started_at=5.0
    )
    back = decode(NodeInfo, encode(info))
    assert back == info
    assert (back.id, back.labels, back.agent_version) == ("n1", {"zone": "a"}, __version__)
    assert (back.cpu_count, back.mem_total, back.bind_host) == (4, 8 << 30, "127.0.1.1")
    assert back.features == [FEATURE_BATCH]  # it verifies batch-signed states


def test_heartbeat_carries_figures_and_services() -> None:
    """A heartbeat holds the sample's figures, the interval and the services' summary."""
    svc = [ServiceSummary(service="hello", version="1.0.0", healthy=True)]
    slots = [SlotProcess(service="hello", slot="a", pid=42, rss=1000)]
    hb = presence.heartbeat(
        node="n1", seq=7, now=100.0, interval=0.5, labels={"zone": "a"}, figures=FIGURES,
        services=svc, slots=slots,
    )
    back = decode(Heartbeat, encode(hb))
    assert (back.node, back.seq, back.time, back.interval) == ("n1", 7, 100.0, 0.5)
    assert (back.cpu_percent, back.mem_percent, back.disk_percent) == (12.0, 34.0, 56.0)
    assert (back.load1, back.agent_rss, back.agent_cpu_percent) == (0.5, 40 << 20, 1.5)
    assert back.services == svc and back.slots == slots


def test_next_beat_keeps_cadence() -> None:
    """On time, the next beat is exactly one interval after the previous due time."""
    assert presence.next_beat(10.0, 2.0, now=10.3) == 12.0


def test_next_beat_skips_missed_beats_after_a_stall() -> None:
    """After a stall the missed beats are not sent in a burst: next is one interval from now."""
    assert presence.next_beat(10.0, 2.0, now=17.0) == 19.0


def test_retry_delay_backs_off_with_jitter_up_to_the_cap() -> None:
    """Delays grow exponentially, stay within [step/2, step] and never pass the cap."""
    rng = random.Random(1)
    for attempt in range(30):
        step = min(presence.RETRY_CAP, presence.RETRY_BASE * 2**attempt)
        d = presence.retry_delay(attempt, rng)
        assert step / 2 <= d <= step
    delays = {presence.retry_delay(3, rng) for _ in range(20)}
    assert len(delays) > 1  # jitter: a fleet does not retry in lock-step


def test_host_sampler_reads_this_host(tmp_path: Path) -> None:
    """The real sampler returns plausible figures for this machine and this process."""
    facts = host_facts()
    assert facts.cpu_count >= 1 and facts.mem_total > 0
    sample = HostSampler(tmp_path).sample()
    assert 0 <= sample.mem_percent <= 100 and 0 <= sample.disk_percent <= 100
    assert sample.agent_rss > 1 << 20


def test_host_sampler_survives_a_missing_data_dir(tmp_path: Path) -> None:
    """A data dir removed under the agent reads as 0% disk instead of stopping heartbeats."""
    gone = tmp_path / "gone"
    assert HostSampler(gone).sample().disk_percent == 0.0


def test_the_leaders_pace_slows_an_agent_never_speeds_it_up() -> None:
    """``Pacing``: the longer of its own interval and the leader's; a change is reported once
    (the agent beats at once to announce it)."""
    p = presence.Pacing(2.0)
    assert p.interval == 2.0 and "own --heartbeat-interval" in p.says()
    assert p.offer(encode(Pace(interval=0.002, nodes=3, rate=2000.0))) is False  # shorter
    assert p.interval == 2.0
    assert p.offer(encode(Pace(interval=25.0, nodes=50_000, rate=2000.0))) is True
    assert p.interval == 25.0
    assert p.says() == ("heartbeat every 25s: the coordinator paces 50000 nodes at 2000 "
                        "heartbeats/s")
    assert p.offer(encode(Pace(interval=25.0, nodes=50_001, rate=2000.0))) is False  # the same
    assert p.offer(encode(Pace(interval=1.0, nodes=800, rate=2000.0))) is True  # back to its own
    assert p.interval == 2.0


@pytest.mark.parametrize("data", [
    b"{not json", b'{"nodes": 3}', b'{"interval": -1}', b'{"interval": 301}',
    b'{"interval": "5"}', b"[]",
])
def test_a_malformed_pace_changes_nothing(data: bytes) -> None:
    p = presence.Pacing(0.5)
    p.offer(encode(Pace(interval=1.5, nodes=3, rate=2.0)))
    with pytest.raises(ProtocolError):
        p.offer(data)
    assert p.interval == 1.5


async def test_the_daemon_tells_its_services_the_pace() -> None:
    """The daemon passes every valid pace to its service manager (whose re-reads and reports
    follow it), also when the interval in force does not change; a malformed pace, or one past
    MAX_INTERVAL, passes nothing."""
    from agent.daemon import Agent, AgentOptions
    from protocol.codec import encode
    from protocol.messages import Pace

    class Services:
        def __init__(self) -> None:
            self.paces: list[Pace] = []

        async def run_local(self, stop: asyncio.Event) -> None:
            pass

        async def run_bus(self, bus: object) -> None:
            pass

        def summary(self) -> tuple[list[object], list[object]]:
            return [], []

        def paced(self, pace: Pace) -> None:
            self.paces.append(pace)

    agent = Agent(AgentOptions(node_id="node-1", nats_url="nats://127.0.0.1:1"))
    services = Services()
    agent._services = services  # type: ignore[assignment]  # what run() sets at its start
    await agent._on_pace("pace", encode(Pace(interval=25.0, nodes=50_000, rate=2000.0)))
    await agent._on_pace("pace", encode(Pace(interval=25.0, nodes=50_100, rate=2000.0)))
    await agent._on_pace("pace", b"not a pace")
    await agent._on_pace("pace", encode(Pace(interval=1e6, nodes=10**9, rate=0.001)))
    assert [(p.nodes, p.interval) for p in services.paces] == [(50_000, 25.0), (50_100, 25.0)]
