"""How an agent makes itself known: its NodeInfo at registration and its periodic Heartbeat.

Pure: everything is built from values handed in (host facts, figures, the service summary, the
time), so the messages can be checked without a host, a bus or a clock. The loops that send them
live in ``agent.daemon``.

Two schedules are decided here too, because they are arithmetic and deserve tests:
- ``Pacing``: the interval an agent beats at, its own ``--heartbeat-interval`` or the leader's
  pace (``messages.Pace``) when that is longer, so that a fleet of 50,000 does not send one
  coordinator 25,000 heartbeats a second;
- ``next_beat``: heartbeats keep a fixed cadence and skip beats that are already late (after a
  stall) instead of sending a burst that would make a dead node look alive;
- ``retry_delay``: registration retries back off exponentially with jitter up to a cap, so a
  fleet waiting for its coordinator does not hammer NATS.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable

from agent import __version__
from agent.host.hostinfo import HostFacts, HostFigures
from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.messages import (
    FEATURE_BATCH,
    Heartbeat,
    NodeInfo,
    Pace,
    ServiceSummary,
    SlotProcess,
)

DEFAULT_INTERVAL = 2.0
MIN_INTERVAL = 0.05
MAX_INTERVAL = 300.0
RETRY_BASE = 0.5
RETRY_CAP = 15.0

_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}\Z")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.-]{1,63}\Z")


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``["zone=a", "role=web"]`` → dict; ProtocolError names the first bad item.

    Same grammar as the coordinator's selectors (``coordinator.core.fleet.parse_selector``) so that
    every label an agent accepts can be selected.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise ProtocolError(
                f"label {item!r} is not key=value; write e.g. --label zone=a (keys and values: "
                "letters, digits, '-', '_', '.')"
            )
        if key in out:
            raise ProtocolError(f"label {key!r} is given twice; keep one --label {key}=...")
        out[key] = value
    return out


def check_interval(seconds: float) -> float:
    """A heartbeat interval the coordinator will honour, or ProtocolError."""
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise ProtocolError(
            f"heartbeat interval {seconds:g}s is out of range; use {MIN_INTERVAL:g}s to "
            f"{MAX_INTERVAL:g}s"
        )
    return seconds


def node_info(
    *,
    node: str,
    labels: dict[str, str],
    facts: HostFacts,
    bind_host: str,
    started_at: float,
    trust_keys: Iterable[str] = (),
) -> NodeInfo:
    """What the agent registers (on connect and on every reconnect); ``trust_keys``: the
    coordinator keys it accepts (public; what a signing-key rotation checks)."""
    return NodeInfo(
        id=node,
        labels=dict(labels),
        agent_version=__version__,
        hostname=facts.hostname,
        platform=facts.platform,
        python=facts.python,
        cpu_count=facts.cpu_count,
        mem_total=facts.mem_total,
        bind_host=bind_host,
        boot_time=facts.boot_time,
        started_at=started_at,
        trust_keys=sorted(trust_keys),
        features=[FEATURE_BATCH],
    )


def heartbeat(
    *,
    node: str,
    seq: int,
    now: float,
    interval: float,
    labels: dict[str, str],
    figures: HostFigures,
    services: list[ServiceSummary],
    slots: list[SlotProcess],
) -> Heartbeat:
    """One heartbeat: the figures of this moment and the services' summary."""
    return Heartbeat(
        node=node,
        seq=seq,
        time=now,
        interval=interval,
        labels=dict(labels),
        cpu_percent=figures.cpu_percent,
        mem_percent=figures.mem_percent,
        disk_percent=figures.disk_percent,
        load1=figures.load1,
        agent_rss=figures.agent_rss,
        agent_cpu_percent=figures.agent_cpu_percent,
        services=services,
        slots=slots,
    )


class Pacing:
    """How often this agent beats: its own interval, or the leader's pace when that is longer.

    A pace can only slow an agent down (never below its own ``--heartbeat-interval``) and never
    past ``MAX_INTERVAL``, so a forged one (on a bus without credentials, where anyone may
    publish it) can make a node's silence take at most 3 x 300 s to notice, nothing worse. The
    interval in force goes out in every Heartbeat: the coordinator judges the node by it.
    """

    def __init__(self, own: float) -> None:
        self.own = own
        self.pace: Pace | None = None

    @property
    def interval(self) -> float:
        return self.own if self.pace is None else max(self.own, self.pace.interval)

    def offer(self, data: bytes) -> bool:
        """Take the leader's Pace message ``data``: True if the interval in force changed
        (beat now, to announce it). ProtocolError, changing nothing, if it is malformed."""
        pace = decode(Pace, data)
        if not (math.isfinite(pace.interval) and 0.0 <= pace.interval <= MAX_INTERVAL):
            raise ProtocolError(f"pace interval {pace.interval!r} is not within 0-"
                                f"{MAX_INTERVAL:g} s")
        before = self.interval
        self.pace = pace
        return self.interval != before

    def says(self) -> str:
        """The log line of the interval in force, and why."""
        p = self.pace
        if p is None or p.interval <= self.own:
            return f"heartbeat every {self.own:g}s (its own --heartbeat-interval)"
        return (f"heartbeat every {self.interval:g}s: the coordinator paces {p.nodes} nodes at "
                f"{p.rate:g} heartbeats/s")


def next_beat(previous: float, interval: float, now: float) -> float:
    """When to send the next heartbeat after the one due at ``previous``.

    On cadence: ``previous + interval``. If that moment has already passed (the loop stalled),
    the missed beats are skipped and the next one is one interval from ``now``.
    """
    due = previous + interval
    return due if due > now else now + interval


def retry_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before registration retry ``attempt`` (0 = first retry): backoff with jitter."""
    step = min(RETRY_CAP, RETRY_BASE * 2.0 ** min(attempt, 16))
    return step / 2 + (rng or random).uniform(0, step / 2)
