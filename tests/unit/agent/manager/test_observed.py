"""agent.manager.observed: what is reported and when, in virtual time (the clock is injected)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

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
