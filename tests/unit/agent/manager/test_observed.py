"""agent.manager.observed: what is reported and when, in virtual time (the clock is injected)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.manager.observed import ObservedWriter
from agent.manager.service import OBSERVE_EVERY, NodeConfig, Service

NODE, FLEET = "node-1", "default"


def _writer(tmp_path: Path, now: list[float]) -> tuple[ObservedWriter, Service]:
    svc = Service(name="hello")
    config = NodeConfig(fleet=FLEET, node=NODE, data_dir=tmp_path, bind_host="127.0.0.1",
                        trusted_keys=frozenset())
    # No bus: observe() only queues (and reads the reconnect count); nothing is written here.
    bus = SimpleNamespace(reconnects=0)
    writer = ObservedWriter(bus, config, {"hello": svc}, clock=lambda: now[0])  # type: ignore[arg-type]
    return writer, svc


def test_an_unchanged_state_is_queued_again_only_every_observe_every(tmp_path: Path) -> None:
    """The same observed state goes out once, then again once OBSERVE_EVERY has passed."""
    now = [1000.0]
    writer, svc = _writer(tmp_path, now)
    writer.observe(svc)
    first = svc.pending_observed
    assert first is not None and first.time == 1000.0 and first.node == NODE
    svc.pending_observed = None
    now[0] += OBSERVE_EVERY - 0.5
    writer.observe(svc)
    assert svc.pending_observed is None
    now[0] += 0.5
    writer.observe(svc)
    again = svc.pending_observed
    assert again is not None and again.time == 1000.0 + OBSERVE_EVERY


def test_a_router_failing_long_enough_fails_the_state_by_the_clock(tmp_path: Path) -> None:
    """A router error is reported at once, and counted against ROUTER_FAILS_AFTER by the clock."""
    from agent.manager.service import ROUTER_FAILS_AFTER

    now = [50.0]
    writer, svc = _writer(tmp_path, now)
    svc.router_error, svc.router_error_since = "port taken", 50.0
    writer.observe(svc)
    obs = svc.pending_observed
    assert obs is not None and obs.error == "router: port taken"
    assert svc.view(now[0]).router_failure == ""
    now[0] += ROUTER_FAILS_AFTER
    assert svc.view(now[0]).router_failure == "port taken"


async def test_a_queued_state_goes_out_only_once_released(tmp_path: Path) -> None:
    """The reconcile loop releases what it queued after saving the agent's state file: an
    agent killed between the two must not have reported what its restart forgets."""
    now = [10.0]
    writer, svc = _writer(tmp_path, now)
    writer.observe(svc)
    assert svc.pending_observed is not None and not writer._dirty.is_set()
    writer.release()
    assert writer._dirty.is_set()
    writer._dirty.clear()
    writer.release()  # nothing new queued: nothing to wake the writer for
    assert not writer._dirty.is_set()


def test_an_unchanged_state_is_queued_again_at_once_after_a_reconnect(tmp_path: Path) -> None:
    """A reconnect may be to a server that restarted and kept no observed bucket (memory): the
    same state goes out again at the next pass, not OBSERVE_EVERY later."""
    now = [1000.0]
    writer, svc = _writer(tmp_path, now)
    writer.observe(svc)
    svc.pending_observed = None
    now[0] += 0.5
    writer.observe(svc)
    assert svc.pending_observed is None
    writer.bus.reconnects += 1
    writer.observe(svc)
    assert svc.pending_observed is not None and svc.pending_observed.time == 1000.5
    svc.pending_observed = None
    writer.observe(svc)
    assert svc.pending_observed is None  # once per reconnect


# -- reports in a large fleet: counters alone are paced, news is not ------------------------------


def _busy(svc: Service, requests: int, at: float, **router: object) -> None:
    """The router's counters as a read at ``at`` finds them (``requests`` served by slot a)."""
    from protocol.testing import router_stats

    stats = router_stats(1.0, at, a=(requests, 0, 3))
    for name, value in router.items():
        setattr(stats, name, value)
    svc.router_stats = stats
    svc.applied_weights = {"a": 100}


def _sent(svc: Service) -> bool:
    got, svc.pending_observed = svc.pending_observed, None
    return got is not None


def test_report_gaps_follow_the_leaders_pace() -> None:
    """No pace, or a short one (a small fleet): every read, and an unchanged state every
    OBSERVE_EVERY; a longer pace (50,000 nodes at 2,000 heartbeats a second: 25 s) spaces
    both."""
    from agent.manager.observed import report_gaps

    assert report_gaps(0.0) == (0.0, OBSERVE_EVERY)
    assert report_gaps(1.5) == (1.5, OBSERVE_EVERY)
    assert report_gaps(25.0) == (25.0, 25.0)
    assert report_gaps(-3.0) == (0.0, OBSERVE_EVERY)


def test_in_a_paced_fleet_new_counters_alone_wait_for_the_pace(tmp_path: Path) -> None:
    """Paced every 25 s (50,000 nodes), a read that brings only new counters (every read of a
    busy router does) is held until 25 s after the last report, which then carries the newest
    ones; an unchanged state is repeated every 25 s, not every 5."""
    now = [1000.0]
    writer, svc = _writer(tmp_path, now)
    writer.paced = 25.0
    _busy(svc, 10, now[0])
    writer.observe(svc)
    assert _sent(svc)
    for step in range(1, 12):  # reads every 2 s, traffic each time
        now[0] += 2.0
        _busy(svc, 10 + step, now[0])
        writer.observe(svc)
        assert not _sent(svc), step
    now[0] += 3.0  # 25 s after the last report
    _busy(svc, 40, now[0])
    writer.observe(svc)
    obs = svc.pending_observed
    assert obs is not None and obs.router is not None and obs.router.slots["a"].requests == 40
    svc.pending_observed = None
    now[0] += OBSERVE_EVERY  # nothing new at all: repeated at the paced gap only
    writer.observe(svc)
    assert not _sent(svc)
    now[0] += 25.0 - OBSERVE_EVERY
    writer.observe(svc)
    assert _sent(svc)


def test_a_small_fleet_reports_every_read_as_before(tmp_path: Path) -> None:
    """No pace heard, or a fleet of a few nodes: every read's counters go out at once."""
    now = [1000.0]
    writer, svc = _writer(tmp_path, now)
    writer.paced = 0.0015
    for step in range(4):
        _busy(svc, 10 + step, now[0])
        writer.observe(svc)
        assert _sent(svc), step
        now[0] += 2.0


def test_in_a_large_fleet_news_goes_out_at_once(tmp_path: Path) -> None:
    """Paced or not, what is not a counter is reported at the next pass: other weights, a
    router restarted (a new epoch), its drain phase, a new phase of the service."""
    now = [1000.0]
    writer, svc = _writer(tmp_path, now)
    writer.paced = 25.0
    _busy(svc, 10, now[0])
    writer.observe(svc)
    assert _sent(svc)
    now[0] += 2.0
    _busy(svc, 11, now[0], epoch=2.0)
    writer.observe(svc)
    assert _sent(svc)
    now[0] += 2.0
    _busy(svc, 12, now[0], epoch=2.0, drain="draining")
    writer.observe(svc)
    assert _sent(svc)
    now[0] += 2.0
    _busy(svc, 13, now[0], epoch=2.0, drain="draining", weights={"a": 50, "b": 50})
    writer.observe(svc)
    assert _sent(svc)
    now[0] += 2.0
    _busy(svc, 14, now[0], epoch=2.0, drain="draining", weights={"a": 50, "b": 50})
    svc.router_error, svc.router_error_since = "port taken", now[0]
    writer.observe(svc)
    assert _sent(svc)


def test_in_a_large_fleet_a_judged_service_reports_every_read(tmp_path: Path) -> None:
    """A wave a gate judges (its desired state asks for stats), a router that splits traffic,
    or weights changed a moment ago: every read's counters go out, the bake's window complete
    when the bake is."""
    from agent.manager.service import STATS_FAST_AFTER_SWITCH
    from protocol.messages import DesiredState

    def reads(svc: Service, writer: ObservedWriter, now: list[float], n: int) -> list[bool]:
        out = []
        for _ in range(n):
            now[0] += 2.0
            requests = svc.router_stats.slots["a"].requests + 1 if svc.router_stats else 0
            weights = dict(svc.applied_weights)
            _busy(svc, requests, now[0])
            svc.applied_weights = weights or {"a": 100}
            writer.observe(svc)
            out.append(_sent(svc))
        return out

    now = [1000.0]
    writer, svc = _writer(tmp_path, now)
    writer.paced = 25.0
    svc.desired = DesiredState(fleet=FLEET, node=NODE, service="hello", generation=1,
                               stats_every=2.0)
    writer.observe(svc)
    assert reads(svc, writer, now, 3) == [True, True, True]

    writer, svc = _writer(tmp_path, now)
    writer.paced = 25.0
    svc.applied_weights = {"a": 90, "b": 10}  # a canary's split
    writer.observe(svc)
    assert reads(svc, writer, now, 3) == [True, True, True]

    writer, svc = _writer(tmp_path, now)
    writer.paced = 25.0
    svc.weights_changed = now[0]
    writer.observe(svc)
    switched = reads(svc, writer, now, 6)
    assert switched[:4] == [True] * 4 and not any(switched[int(STATS_FAST_AFTER_SWITCH // 2):])


def test_a_service_a_running_rollout_reads_reports_every_read(tmp_path: Path) -> None:
    """Paced every 25 s, a service the pace names as read by a running rollout (its old slots'
    traffic is the gates' comparison too) reports every read; once the rollout ends, counters
    alone wait for the pace again."""
    now = [1000.0]
    writer, svc = _writer(tmp_path, now)
    writer.paced = 25.0
    writer.reading = frozenset({"hello"})
    _busy(svc, 10, now[0])
    writer.observe(svc)
    assert _sent(svc)
    for step in range(1, 4):
        now[0] += 2.0
        _busy(svc, 10 + step, now[0])
        writer.observe(svc)
        assert _sent(svc), step
    writer.reading = frozenset({"other"})
    now[0] += 2.0
    _busy(svc, 20, now[0])
    writer.observe(svc)
    assert not _sent(svc)


def test_a_read_a_moment_early_for_the_pace_is_not_held_a_whole_read(tmp_path: Path) -> None:
    """Reads come every 2 s, a little early or late: paced every 2 s, each one still goes out
    (a read 10 ms before the pace's interval was up waited a whole read more)."""
    now = [1000.0]
    writer, svc = _writer(tmp_path, now)
    writer.paced = 1.995
    sent = []
    for step in range(10):
        now[0] += 2.0 + (0.01 if step % 2 else -0.01)
        _busy(svc, 10 + step, now[0])
        writer.observe(svc)
        sent.append(_sent(svc))
    assert all(sent), sent


async def test_a_service_the_pace_starts_reading_reports_at_once(tmp_path: Path) -> None:
    """When the pace first names a service (its rollout starts), its next pass reports its
    counters at once, paced or not, and the reconcile loop is woken for it."""
    from agent.manager.shell import ServiceManager
    from protocol.messages import Pace

    mgr = ServiceManager(fleet=FLEET, node=NODE,
                         data_dir=tmp_path, bind_host="127.0.0.1", trusted_keys=[])
    svc = mgr.services["hello"] = Service(name="hello")
    svc.last_observed_state = b"reported"
    mgr.paced(Pace(interval=25.0, nodes=50_000, rate=2000.0))
    assert svc.last_observed_state == b"reported" and not mgr.wake.is_set()
    mgr.paced(Pace(interval=25.0, nodes=50_000, rate=2000.0, reading=["hello"]))
    assert svc.last_observed_state == b"" and mgr.wake.is_set()
    assert mgr.observed.reading == {"hello"}
    mgr.paced(Pace(interval=25.0, nodes=50_000, rate=2000.0))  # a new leader, not ready yet
    assert mgr.observed.reading == {"hello"}  # kept
    mgr.paced(Pace(interval=25.0, nodes=50_000, rate=2000.0, reading=[]))
    assert mgr.observed.reading == frozenset()


class _Silent:
    """A bus that never answers (a broker gone quiet): every call waits for ever."""

    reconnects = 0

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        await asyncio.Event().wait()


async def test_a_write_that_times_out_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """An observed state the bus takes no answer for within BUS_TIMEOUT: the log line ends with
    "timed out", not an empty reason (a review found "cannot write observed state of hello: ")."""
    import agent.manager.observed as observed_mod

    monkeypatch.setattr(observed_mod, "BUS_TIMEOUT", 0.01)
    svc = Service(name="hello")
    config = NodeConfig(fleet=FLEET, node=NODE, data_dir=tmp_path, bind_host="127.0.0.1",
                        trusted_keys=frozenset())
    writer = ObservedWriter(_Silent(), config, {"hello": svc}, clock=lambda: 1.0)  # type: ignore[arg-type]
    writer.observe(svc)
    writer.release()
    with caplog.at_level(logging.WARNING, logger="fleetwave.agent.services"):
        running = asyncio.create_task(writer.run())
        for _ in range(200):
            if caplog.records:
                break
            await asyncio.sleep(0.01)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert [r.getMessage() for r in caplog.records] == [
        "cannot write observed state of hello: timed out"]

