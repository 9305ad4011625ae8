"""agent.host.probes, the pure parts: thresholds, and the prober's pacing with a fake sleep.

The http, tcp and exec attempts against real sockets and processes are in
tests/integration/test_agent_probes.py."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from agent.host import probes
from agent.host.probes import (
    Prober,
    ProbeResult,
    Thresholds,
    probe_once,
)
from protocol.manifest import HealthConfig


def test_thresholds_need_consecutive_successes_to_become_healthy() -> None:
    """Healthy only after healthy_threshold successes in a row; a failure resets the run."""
    t = Thresholds(healthy_threshold=2, unhealthy_threshold=3)
    assert [t.feed(x) for x in (True, False, True, True)] == [None, None, None, True]
    assert t.healthy


def test_thresholds_need_consecutive_failures_to_become_unhealthy() -> None:
    """Once healthy, unhealthy_threshold failures in a row are needed, and a success resets."""
    t = Thresholds(healthy_threshold=1, unhealthy_threshold=2, healthy=True)
    assert [t.feed(x) for x in (False, True, False, False)] == [None, None, None, False]
    assert [t.feed(x) for x in (True,)] == [True]


def test_thresholds_report_only_changes() -> None:
    """Repeated successes after becoming healthy report nothing new."""
    t = Thresholds(healthy_threshold=1, unhealthy_threshold=1)
    assert [t.feed(True) for _ in range(3)] == [True, None, None]


async def test_no_probe_configured_passes(tmp_path: Path) -> None:
    """A manifest without a health check is healthy once its process runs."""
    assert (await probe_once(HealthConfig(), None, tmp_path, {})).ok


async def test_prober_probes_at_start_interval_until_first_healthy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``start_interval`` paces the probes until the slot is first healthy, ``interval`` after
    (also after it turns unhealthy again: the start period is over)."""
    periods: list[float] = []
    results = iter([True, True, True, False, False, True] + [True] * 100)
    enough = asyncio.Event()

    async def fake_sleep(period: float) -> None:
        periods.append(period)
        if len(periods) >= 8:
            enough.set()
        await asyncio.sleep(0)

    async def fake_probe(*_: object) -> ProbeResult:
        return ProbeResult(next(results), "")

    monkeypatch.setattr(probes, "sleep_to_tick", fake_sleep)
    monkeypatch.setattr(probes, "probe_once", fake_probe)
    changes: list[bool] = []

    async def on_change(healthy: bool, reason: str) -> None:
        changes.append(healthy)

    health = HealthConfig(interval=1.0, start_interval=0.2, healthy_threshold=2,
                          unhealthy_threshold=2)
    task = asyncio.create_task(Prober(health, None, tmp_path, {}, on_change).run())
    await asyncio.wait_for(enough.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert changes[:2] == [True, False]
    assert periods[:8] == [0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


async def test_a_stopped_prober_ends_without_a_cancel(tmp_path: Path) -> None:
    """stop() alone ends run() at its next turn: a cancel that Python 3.11 turns into a probe's
    TimeoutError must not leave the loop probing for ever (it held a slot's supervisor)."""
    changes: list[bool] = []
    probed = asyncio.Event()

    async def on_change(healthy: bool, reason: str) -> None:
        changes.append(healthy)
        probed.set()

    prober = Prober(HealthConfig(interval=0.01), None, tmp_path, {}, on_change)
    task = asyncio.create_task(prober.run())
    await asyncio.wait_for(probed.wait(), 5)  # a manifest without probe passes at once
    prober.stop()
    await asyncio.wait_for(task, 5)
    assert changes == [True]


def test_listen_polls_start_fast_and_settle() -> None:
    """5 ms after a refused probe, then x1.5 each time up to LISTEN_POLL_MAX (20 ms)."""
    polls = probes.listen_polls()
    assert [round(next(polls), 6) for _ in range(6)] == [
        0.005, 0.0075, 0.01125, 0.016875, 0.02, 0.02]


async def test_only_a_refused_probe_of_a_starting_slot_watches_the_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before the first healthy: the port is watched (no wait for the grid), and every
    probe after the early one, until the first healthy, comes a whole period after the last
    (not at the grid's next point, which may be a few ms away: the passes the threshold counts
    are a period apart, also after a 503 in between: a review found a 503, a pass and one 16 ms
    later taken as healthy). Once healthy, the grid's ``interval``, and a refusal waits for it
    too (a running slot's probe pace is ``interval``, whatever the failure)."""
    results = iter([
        ProbeResult(False, "refused", refused=True),  # -> the port watched: listening
        ProbeResult(True),  # early -> a whole start_interval
        ProbeResult(False, "status 503"),  # -> a whole start_interval
        ProbeResult(True),  # -> a whole start_interval
        ProbeResult(True),  # healthy (two in a row) -> the grid's interval
        ProbeResult(False, "refused", refused=True),  # healthy before -> the grid's interval
    ] + [ProbeResult(True)] * 100)
    calls: list[object] = []
    enough = asyncio.Event()

    async def fake_sleep(period: float) -> None:
        calls.append(period)
        if len(calls) >= 6:
            enough.set()
        await asyncio.sleep(0)

    async def fake_sleep_for(period: float) -> None:
        calls.append(("whole", period))
        await asyncio.sleep(0)

    async def fake_probe(*_: object) -> ProbeResult:
        return next(results)

    async def fake_listening(self: Prober, http: object, left: float) -> bool:
        calls.append("listening")
        return True

    monkeypatch.setattr(probes, "sleep_to_tick", fake_sleep)
    monkeypatch.setattr(probes, "sleep_for", fake_sleep_for)
    monkeypatch.setattr(probes, "probe_once", fake_probe)
    monkeypatch.setattr(Prober, "_listening", fake_listening)

    async def on_change(healthy: bool, reason: str) -> None:
        pass

    # A start_interval of an hour: the port's watch ends at the grid's next point, which a
    # loaded test machine must not reach before the first connect attempt (with 0.2 s it did,
    # one run in a few hundred: no "listening", the early probe never made).
    start = 3600.0
    health = HealthConfig(tcp=True, interval=1.0, start_interval=start, healthy_threshold=2)
    task = asyncio.create_task(Prober(health, 8080, tmp_path, {}, on_change).run())
    await asyncio.wait_for(enough.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert calls[:6] == ["listening", ("whole", start), ("whole", start), ("whole", start),
                         1.0, 1.0]


async def test_a_prober_of_a_slot_healthy_before_it_turns_unhealthy_on_the_grid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``healthy=True`` (an adopted slot that was healthy before the agent's restart): refusals
    are failures probed every ``interval`` on the grid, never a starting slot's watch of its
    port, and ``unhealthy_threshold`` of them turn it unhealthy. A review found such a slot
    polled 50 times a second for ever and never turning unhealthy."""
    calls: list[object] = []
    enough = asyncio.Event()

    async def fake_sleep(period: float) -> None:
        calls.append(period)
        if len(calls) >= 3:
            enough.set()
        await asyncio.sleep(0)

    async def fake_probe(*_: object) -> ProbeResult:
        return ProbeResult(False, "refused", refused=True)

    async def fake_listening(self: Prober, http: object, left: float) -> bool:
        calls.append("listening")
        return False

    monkeypatch.setattr(probes, "sleep_to_tick", fake_sleep)
    monkeypatch.setattr(probes, "probe_once", fake_probe)
    monkeypatch.setattr(Prober, "_listening", fake_listening)
    changes: list[tuple[bool, str]] = []

    async def on_change(healthy: bool, reason: str) -> None:
        changes.append((healthy, reason))

    health = HealthConfig(tcp=True, interval=1.0, start_interval=0.2, unhealthy_threshold=2)
    task = asyncio.create_task(Prober(health, 8080, tmp_path, {}, on_change,
                                      healthy=True).run())
    await asyncio.wait_for(enough.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert calls[:3] == [1.0, 1.0, 1.0]
    assert changes == [(False, "refused")]
