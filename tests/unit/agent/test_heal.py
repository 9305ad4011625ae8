"""Self-healing in the pure reconciler, in fake time: when a slot that stays unhealthy is
restarted, make-before-break, how the wait backs off, and how a spent budget is reported."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backoff import Backoff
from agent.host.slots import CrashPolicy
from agent.host.state import AgentState, ServiceRecord, SlotRecord, load_state, save_state
from agent.manager.service import Service, release_info, settled
from agent.manager.shell import ServiceManager
from agent.reconcile import (
    HEAL_RESTARTS,
    HEAL_WINDOW,
    LOOP,
    Action,
    Drain,
    ReleaseInfo,
    Report,
    Restart,
    Route,
    ServiceView,
    SlotView,
    Start,
    Stop,
    assess,
    reconcile,
)
from protocol.errors import ProtocolError
from protocol.manifest import parse_manifest
from protocol.messages import SLOTS, DesiredState, ReleaseRef
from tests.unit.agent.test_reconcile import V1, V2, _check, _outcome, desired, desired_st, healthy
from tests.unit.agent.test_reconcile import _apply as _apply_any

AFTER = 5.0
HEAL = {r.digest: ReleaseInfo(r.digest, port=8080, start_timeout=30, drain=2, stop_timeout=7,
                              restart_after=AFTER) for r in (V1, V2)}
ONE = desired(1, {"a": V1}, {"a": 100})
CANARY = desired(1, {"a": V1, "b": V2}, {"a": 90, "b": 10})


def hung(slot: str, ref: ReleaseRef = V1, since: float = 0.0, heals: tuple[float, ...] = (),
         reason: str = "GET /healthz: status 503") -> SlotView:
    return replace(healthy(slot, ref), status="unhealthy", since=since, heals=heals, reason=reason)


def view(*slots: SlotView, weights: dict[str, int] | None = None,
         releases: dict[str, ReleaseInfo] | None = None) -> ServiceView:
    return ServiceView(service="hello", slots={s.slot: s for s in slots},
                       releases=HEAL if releases is None else releases,
                       applied_weights=weights or {})


def restarts(acts: list[Action]) -> list[Restart]:
    return [a for a in acts if isinstance(a, Restart)]


# -- when ------------------------------------------------------------------------------------------


def test_unhealthy_for_less_than_restart_after_is_left_alone() -> None:
    """Before restart_after the hung slot keeps its place and nothing new starts."""
    assert reconcile(ONE, view(hung("a", since=10.0)), 10.0 + AFTER - 0.1) == []


def test_restart_after_0_turns_healing_off() -> None:
    """restart_after = "0": a hung slot stays as it is, and no heal timer keeps the loop busy."""
    off = {d: replace(i, restart_after=0) for d, i in HEAL.items()}
    local = view(hung("a"), releases=off)
    assert reconcile(ONE, local, 1e6) == []
    assert settled(local), "nothing to time: the loop may idle"
    assert not settled(view(hung("a"))), "a heal timer runs: the loop must tick"


def test_a_slot_never_healthy_is_start_timeouts_business() -> None:
    """A starting slot (never healthy) is failed at start_timeout, never restarted by healing."""
    starting = replace(healthy("a", V1), status="starting", since=0.0)
    assert not restarts(reconcile(ONE, view(starting), 29.0))


# -- make-before-break -----------------------------------------------------------------------------


def test_alone_it_gets_a_bridge_first_and_is_restarted_once_the_bridge_serves() -> None:
    """The only slot hangs: the same release starts in the free slot; the hung slot is stopped
    only once the router gives the bridge weight."""
    assert reconcile(ONE, view(hung("a")), AFTER) == [Start("b", V1, 1)]
    starting = replace(healthy("b", V1), status="starting", since=AFTER)
    assert reconcile(ONE, view(hung("a"), starting), AFTER + 1) == []
    bridge = healthy("b", V1, since=AFTER + 1)
    assert reconcile(ONE, view(hung("a"), bridge), AFTER + 1) == [Route({"a": 0, "b": 100}, None)]
    acts = restarts(reconcile(ONE, view(hung("a"), bridge, weights={"b": 100}), AFTER + 1))
    assert [(a.slot, a.timeout) for a in acts] == [("a", 7)]
    assert "unhealthy for 6s (health.restart_after 5s): restart 1 of at most 3" in acts[0].reason
    assert reconcile(ONE, view(hung("a"), bridge, weights={"b": 100}), AFTER + 1) == acts


def test_whole_heal_in_fake_time_never_routes_to_a_hung_slot() -> None:
    """Hung a → bridge b serves → a restarted → a healthy again → traffic back on a, b retired."""
    local, now, seen = view(hung("a"), weights={}), AFTER, []
    for _ in range(40):
        acts = reconcile(ONE, local, now)
        seen += acts
        for act in acts:
            local = _apply(local, act, now)
            if isinstance(act, Route):
                assert all(local.slot(s).status == "healthy" for s, w in act.weights.items() if w)
        local = _become_healthy(local, now)
        now += 1.0
    kinds = [type(a).__name__ + ":" + getattr(a, "slot", "") for a in seen]
    assert kinds.index("Start:b") < kinds.index("Restart:a") < kinds.index("Start:a")
    assert kinds.index("Start:a") < kinds.index("Drain:b") < kinds.index("Stop:b")
    assert local.applied_weights == {"a": 100}
    assert local.slot("a").status == "healthy" and local.slot("a").heals == (AFTER + 2,)
    assert local.slot("b").status == "stopped"
    assert assess(ONE, local).phase == "converged"


def test_bridge_is_stopped_if_the_hung_slot_recovers_first() -> None:
    """The hung slot turns healthy again while its bridge starts: the bridge is not needed."""
    starting = replace(healthy("b", V1), status="starting", since=AFTER)
    acts = reconcile(ONE, view(healthy("a", V1), starting, weights={"a": 100}), AFTER + 1)
    assert acts == [Stop("b", 7)]


def test_taken_other_slot_means_restart_in_place() -> None:
    """Both slots desired (a canary): the healthy one serves, the hung one restarts in place."""
    local = view(hung("b", V2), healthy("a", V1), weights={"a": 90})
    assert [type(a) for a in reconcile(CANARY, local, AFTER)] == [Restart]


def test_a_failed_bridge_means_restart_in_place() -> None:
    """The bridge could not start (failed for this generation): nothing serves, restart anyway."""
    failed = replace(healthy("b", V1), status="failed", generation=1, reason="crash loop")
    assert [type(a) for a in reconcile(ONE, view(hung("a"), failed), AFTER)] == [Restart]


# -- back-off and budget ---------------------------------------------------------------------------


@pytest.mark.parametrize(("earlier", "wait"), [(0, AFTER), (1, 2 * AFTER), (2, 4 * AFTER)])
def test_the_wait_doubles_with_each_recent_restart(earlier: int, wait: float) -> None:
    heals = tuple(100.0 + i for i in range(earlier))
    local = view(hung("b", V2, since=200.0, heals=heals), healthy("a", V1), weights={"a": 90})
    assert not restarts(reconcile(CANARY, local, 200.0 + wait - 0.1))
    assert restarts(reconcile(CANARY, local, 200.0 + wait))


def test_spent_budget_is_reported_once_and_fails_the_state() -> None:
    heals = tuple(100.0 + i for i in range(HEAL_RESTARTS))
    local = view(hung("b", V2, since=200.0, heals=heals), healthy("a", V1), weights={"a": 90})
    assert reconcile(CANARY, local, 200.0 + AFTER - 0.1) == []
    acts = reconcile(CANARY, local, 200.0 + AFTER)
    assert len(acts) == 1 and isinstance(acts[0], Report) and acts[0].slot == "b"
    assert acts[0].reason.startswith(f"{LOOP}: unhealthy again after 3 restarts within 10m")
    assert "GET /healthz: status 503" in acts[0].reason
    reported = replace(local, slots={**local.slots, "b": replace(local.slot("b"),
                                                                  reason=acts[0].reason)})
    assert reconcile(CANARY, reported, 300.0) == []
    a = assess(CANARY, reported)
    assert a.phase == "failed" and f"slot b (2.0.0) is in a {LOOP}" in a.error
    # Once the oldest restart leaves the window, one more is allowed (after the longest wait).
    later = 100.0 + HEAL_WINDOW
    assert [type(x) for x in reconcile(CANARY, reported, later)] == [Restart]


def test_backoff_is_the_crash_policys() -> None:
    """Crash restarts and heals share one back-off: same waits, same budget."""
    policy = CrashPolicy(max_restarts=3, window=60, first=0.5, cap=3)
    waits = [policy.on_crash(float(t)) for t in range(5)]
    assert waits == [0.5, 1.0, 2.0, None, None]
    b = Backoff(3, 60, 0.5, 3)
    assert [b.delay(n) for n in range(4)] == [0.5, 1.0, 2.0, None]
    assert b.recent([0.0, 10.0, 65.0], 65.0) == [10.0, 65.0]


def test_the_budget_belongs_to_the_release_a_slot_runs() -> None:
    """The agent keeps restart times per slot and release: a new release starts with a whole
    budget; the manifest's restart_after reaches the reconciler."""
    svc = Service(name="hello", idle={"a": hung("a", V2)})
    svc.heals = {("a", V1.digest): [1.0, 2.0, 3.0], ("a", V2.digest): [4.0]}
    assert svc.view().slot("a").heals == (4.0,)
    manifest = parse_manifest(BASE + 'restart_after = "7s"\n')
    assert release_info("sha256:x", manifest).restart_after == 7.0


# -- the manifest ----------------------------------------------------------------------------------

BASE = 'name = "x"\nversion = "1"\ncommand = ["x"]\nport = 1\n[health]\nhttp = "/"\n'


def test_manifest_restart_after_defaults_to_30s_and_takes_0_for_off() -> None:
    assert parse_manifest(BASE).health.restart_after == 30.0
    assert parse_manifest(BASE + 'restart_after = "0"\n').health.restart_after == 0.0
    assert parse_manifest(BASE + 'restart_after = "1m"\n').health.restart_after == 60.0


@pytest.mark.parametrize("value", ["30", "5"])
def test_manifest_restart_after_must_be_a_duration(value: str) -> None:
    with pytest.raises(ProtocolError, match=r"health\.restart_after"):
        parse_manifest(BASE + f"restart_after = {value}\n")


# -- a tiny simulator ------------------------------------------------------------------------------


def _apply(local: ServiceView, act: Action, now: float) -> ServiceView:
    slots = dict(local.slots)
    match act:
        case Start(slot=s, release=ref, generation=g):
            slots[s] = SlotView(slot=s, status="starting", digest=ref.digest, since=now,
                                generation=g, heals=local.slot(s).heals)
        case Route(weights=w):
            return replace(local, applied_weights={s: x for s, x in w.items() if x > 0})
        case Drain(slot=s):
            slots[s] = replace(local.slot(s), status="draining", since=now)
        case Stop(slot=s):
            slots[s] = replace(local.slot(s), status="stopped", since=now)
        case Restart(slot=s):
            cur = local.slot(s)
            slots[s] = replace(cur, status="stopped", since=now, heals=(*cur.heals, now))
    return replace(local, slots=slots)


def _become_healthy(local: ServiceView, now: float) -> ServiceView:
    slots = {s: replace(v, status="healthy", since=now) if v.status == "starting" else v
             for s, v in local.slots.items()}
    return replace(local, slots=slots)


# -- property: healing keeps the reconciler's promises ---------------------------------------------

heal_steps = st.lists(
    st.tuples(st.sampled_from(SLOTS),
              st.sampled_from(["healthy", "unhealthy", "time"])),
    min_size=5, max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), desired_st.filter(lambda d: bool(d.slots)), heal_steps)
def test_healing_never_routes_to_unhealthy_nor_restarts_a_serving_slot(
    worker: bool, d: DesiredState, steps: list[tuple[str, str]]
) -> None:
    """Slots of one desired state turn healthy and unhealthy as time passes: whatever comes,
    healing neither routes to an unhealthy slot nor stops the last healthy one, and a Restart
    only ever hits an unhealthy slot without traffic (``_check``)."""
    local, now = ServiceView(service="hello"), 0.0
    for slot, outcome in steps:
        now += 3.0 if outcome == "time" else 0.1
        local = _outcome(local, slot, outcome, now)
        for _ in range(3):
            acts = reconcile(d, local, now)
            _check(d, local, acts, worker)
            for act in acts:
                local = _apply_any(local, act, now, worker)


def test_the_property_reaches_restarts() -> None:
    """The scenario above does restart slots (a property that never heals would prove nothing)."""
    d = desired(1, {"a": V1}, {"a": 100})
    local, now, kinds = ServiceView(service="hello"), 0.0, set()
    for slot, outcome in [("a", "tick"), ("a", "healthy"), ("a", "tick"), ("a", "unhealthy"),
                          ("a", "time"), ("b", "healthy"), ("b", "tick"), ("a", "tick")]:
        now += 3.0 if outcome == "time" else 0.1
        local = _outcome(local, slot, outcome, now)
        for _ in range(3):
            for act in reconcile(d, local, now):
                kinds.add(type(act).__name__)
                local = _apply_any(local, act, now, False)
    assert "Restart" in kinds


async def test_a_restarted_agent_keeps_the_restart_budget(tmp_path: Path) -> None:
    """The restart times are in the state file: a restarted agent does not get a fresh budget."""
    rec = SlotRecord(slot="b", status="failed", digest=V2.digest, version="2.0.0",
                     reason="x", heals=[1.0, 2.0])
    mgr = _manager(tmp_path)
    save_state(mgr.restorer.state_path, AgentState(services={
        "hello": ServiceRecord(service="hello", slots={"b": rec}),
    }))
    await mgr.restorer.restore(lambda *_: None)
    svc = mgr.services["hello"]
    assert svc.view().slot("b").heals == (1.0, 2.0)
    mgr.restorer.save_now()
    assert load_state(mgr.restorer.state_path).services["hello"].slots["b"].heals == [1.0, 2.0]


def _manager(tmp_path: Path) -> ServiceManager:
    return ServiceManager(fleet="default", node="n", data_dir=tmp_path,
                          bind_host="127.0.0.1", trusted_keys=[])
