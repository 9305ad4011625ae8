"""The pure reconciler: table tests of each decision, and property tests of its two promises."""

from __future__ import annotations

from dataclasses import replace
from typing import get_args

import msgspec
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent.manager.service import ROUTER_FAILS_AFTER, Service
from agent.reconcile import (
    SLOT_RULES,
    Action,
    CloseRouter,
    Drain,
    Fail,
    Fetch,
    FetchError,
    ReleaseInfo,
    Report,
    Restart,
    Resume,
    Route,
    ServiceView,
    SlotView,
    Start,
    Stop,
    assess,
    reconcile,
)
from protocol.messages import SLOTS, DesiredState, MirrorSpec, ReleaseRef, SlotStatusName

V1 = ReleaseRef(service="hello", version="1.0.0", digest="sha256:11")
V2 = ReleaseRef(service="hello", version="2.0.0", digest="sha256:22")
V3 = ReleaseRef(service="hello", version="3.0.0", digest="sha256:33")
INFO = {r.digest: ReleaseInfo(r.digest, port=8080, start_timeout=30, drain=2) for r in (V1, V2, V3)}
WINFO = {r.digest: ReleaseInfo(r.digest, port=None, start_timeout=30, drain=2) for r in (V1, V2)}


def desired(
    gen: int,
    slots: dict[str, ReleaseRef],
    weights: dict[str, int],
    mirror: MirrorSpec | None = None,
) -> DesiredState:
    return DesiredState(
        fleet="f",
        node="n",
        service="hello",
        generation=gen,
        slots=slots,
        weights=weights,
        mirror=mirror,
    )


def view(
    *slots: SlotView,
    weights: dict[str, int] | None = None,
    releases=None,
    mirror: MirrorSpec | None = None,
    **kw,
) -> ServiceView:
    return ServiceView(
        service="hello",
        slots={s.slot: s for s in slots},
        releases=INFO if releases is None else releases,
        applied_weights=weights or {},
        applied_mirror=mirror,
        **kw,
    )


def healthy(slot: str, ref: ReleaseRef, since: float = 0.0) -> SlotView:
    return SlotView(
        slot=slot,
        status="healthy",
        digest=ref.digest,
        version=ref.version,
        since=since,
        generation=1,
    )


def serving_v1() -> ServiceView:
    return view(healthy("a", V1), weights={"a": 100})


# -- table tests -----------------------------------------------------------------------------------


def test_nothing_desired_does_nothing() -> None:
    """Without an accepted desired state the reconciler leaves everything as it is."""
    assert reconcile(None, serving_v1(), 10.0) == []


def test_fetches_a_release_it_does_not_have() -> None:
    """A wanted release that is not local is fetched first, once."""
    d = desired(2, {"a": V1, "b": V2}, {"a": 100})
    acts = reconcile(
        d, view(healthy("a", V1), weights={"a": 100}, releases={V1.digest: INFO[V1.digest]}), 1.0
    )
    assert acts == [Fetch(V2)]


def test_fetch_in_flight_is_not_repeated() -> None:
    """While a digest is being fetched no second Fetch is issued."""
    d = desired(2, {"a": V1, "b": V2}, {"a": 100})
    local = view(
        healthy("a", V1),
        weights={"a": 100},
        releases={V1.digest: INFO[V1.digest]},
        fetching=frozenset({V2.digest}),
    )
    assert reconcile(d, local, 1.0) == []


def test_failed_fetch_is_retried_after_a_pause_and_reported() -> None:
    """A failed fetch waits FETCH_RETRY before the next try, and the phase says failed."""
    d = desired(2, {"a": V1, "b": V2}, {"a": 100})
    local = view(
        healthy("a", V1),
        weights={"a": 100},
        releases={V1.digest: INFO[V1.digest]},
        fetch_errors={V2.digest: FetchError("sha256 mismatch", at=10.0)},
    )
    assert reconcile(d, local, 12.0) == []
    assert reconcile(d, local, 15.0) == [Fetch(V2)]
    a = assess(d, local)
    assert a.phase == "failed" and "sha256 mismatch" in a.error


def test_a_bus_outage_while_fetching_is_retried_not_a_failure() -> None:
    """A transient fetch error (broker away) is retried and leaves the phase converging."""
    d = desired(2, {"a": V1, "b": V2}, {"a": 100})
    local = view(
        healthy("a", V1),
        weights={"a": 100},
        releases={V1.digest: INFO[V1.digest]},
        fetch_errors={V2.digest: FetchError("nats: timeout", at=10.0, transient=True)},
    )
    assert reconcile(d, local, 15.0) == [Fetch(V2)]
    assert assess(d, local).phase == "converging"


def test_a_router_that_cannot_take_its_configuration_fails_the_desired_state() -> None:
    """A router failure the shell has seen for long enough (``router_failure``) is a failed
    phase naming it; without one the same view is converging."""
    d = desired(2, {"a": V1}, {"a": 100})
    failing = view(healthy("a", V1), router_failure="cannot listen on 127.0.0.1:8080")
    a = assess(d, failing)
    assert a.phase == "failed" and "router: cannot listen" in a.error
    assert assess(d, view(healthy("a", V1))).phase == "converging"


def test_the_service_reports_a_router_failure_only_after_it_lasted() -> None:
    """Service.view puts the router's error in the view once it has lasted ROUTER_FAILS_AFTER."""
    svc = Service(name="hello")
    svc.router_error, svc.router_error_since = "cannot listen", 100.0
    assert svc.view(100.0 + ROUTER_FAILS_AFTER - 0.1).router_failure == ""
    assert svc.view(100.0 + ROUTER_FAILS_AFTER).router_failure == "cannot listen"
    assert svc.view().router_failure == ""  # no clock, no verdict
    svc.router_error = ""
    assert svc.view(1e9).router_failure == ""


def test_new_release_starts_in_the_idle_slot_without_traffic() -> None:
    """The new slot starts; the router is not touched until it is healthy."""
    d = desired(2, {"a": V1, "b": V2}, {"b": 100})
    assert reconcile(d, serving_v1(), 1.0) == [Start("b", V2, 2)]


def test_starting_slot_gets_no_weight_and_old_keeps_serving() -> None:
    """While the new slot starts the old one keeps all traffic and is not drained."""
    d = desired(2, {"b": V2}, {"b": 100})
    local = view(
        healthy("a", V1),
        SlotView(slot="b", status="starting", digest=V2.digest, since=1),
        weights={"a": 100},
    )
    assert reconcile(d, local, 2.0) == []


def test_weights_shift_only_when_new_slot_is_healthy() -> None:
    """Once the new slot is healthy the router moves traffic; the old slot is not drained yet."""
    d = desired(2, {"b": V2}, {"b": 100})
    local = view(healthy("a", V1), healthy("b", V2), weights={"a": 100})
    assert reconcile(d, local, 3.0) == [Route({"a": 0, "b": 100}, None)]


def test_old_slot_drains_after_weights_moved_then_stops_after_drain() -> None:
    """Drain starts when the router no longer sends it traffic; stop comes after stop.drain."""
    d = desired(2, {"b": V2}, {"b": 100})
    local = view(healthy("a", V1), healthy("b", V2), weights={"b": 100})
    assert reconcile(d, local, 3.0) == [Drain("a")]
    draining = replace(
        local, slots={**local.slots, "a": replace(local.slots["a"], status="draining", since=3.0)}
    )
    assert reconcile(d, draining, 4.0) == []
    assert reconcile(d, draining, 5.0) == [Stop("a", 10.0)]


def test_converged_only_when_everything_is_true() -> None:
    """observed_generation moves only once slots, weights and stops all match."""
    d = desired(2, {"b": V2}, {"b": 100})
    stopped = SlotView(slot="a", status="stopped", digest=V1.digest)
    assert (
        assess(d, view(healthy("a", V1), healthy("b", V2), weights={"b": 100})).phase
        == "converging"
    )
    assert (
        assess(d, view(stopped, healthy("b", V2), weights={"a": 1, "b": 100})).phase == "converging"
    )
    done = assess(d, view(stopped, healthy("b", V2), weights={"b": 100}, observed_generation=1))
    assert (done.phase, done.observed_generation) == ("converged", 2)
    assert (
        assess(
            d, view(stopped, healthy("b", V1), weights={"b": 100}, observed_generation=1)
        ).observed_generation
        == 1
    )


def test_start_timeout_fails_the_new_slot_and_old_keeps_serving() -> None:
    """A slot still starting after start_timeout fails; the old slot is not touched."""
    d = desired(2, {"b": V2}, {"b": 100})
    local = view(
        healthy("a", V1),
        SlotView(slot="b", status="starting", digest=V2.digest, since=1.0, generation=2),
        weights={"a": 100},
    )
    assert reconcile(d, local, 30.0) == []
    assert reconcile(d, local, 31.0) == [Fail("b", "not healthy within 30s (health.start_timeout)")]


def test_failed_generation_is_not_retried_but_a_new_generation_is() -> None:
    """A failed slot stays failed for its generation; the next generation starts it again."""
    failed = SlotView(slot="b", status="failed", digest=V2.digest, generation=2, reason="exit 1")
    local = view(healthy("a", V1), failed, weights={"a": 100})
    d2 = desired(2, {"b": V2}, {"b": 100})
    assert reconcile(d2, local, 100.0) == []
    a = assess(d2, local)
    assert a.phase == "failed" and "exit 1" in a.error and a.observed_generation == 0
    assert reconcile(desired(3, {"b": V2}, {"b": 100}), local, 100.0) == [Start("b", V2, 3)]


def test_unhealthy_slot_loses_its_weight_to_a_healthy_one() -> None:
    """A serving slot that turns unhealthy gets weight 0 while another healthy slot exists."""
    d = desired(2, {"a": V1, "b": V2}, {"a": 50, "b": 50})
    local = view(
        healthy("a", V1), replace(healthy("b", V2), status="unhealthy"), weights={"a": 50, "b": 50}
    )
    assert reconcile(d, local, 1.0) == [Route({"a": 50, "b": 0}, None)]


def test_fallback_keeps_old_slot_serving_when_new_one_failed() -> None:
    """An undesired but healthy old slot keeps its traffic while nothing desired is healthy."""
    d = desired(2, {"b": V2}, {"b": 100})
    failed = SlotView(slot="b", status="failed", digest=V2.digest, generation=2)
    assert reconcile(d, view(healthy("a", V1), failed, weights={"a": 100}), 5.0) == []


def test_draining_slot_is_taken_back_when_its_replacement_goes_unhealthy() -> None:
    """If the replacement turns unhealthy mid-drain the drained slot resumes and gets traffic."""
    d = desired(2, {"b": V2}, {"b": 100})
    local = view(
        SlotView(slot="a", status="draining", digest=V1.digest, since=1.0),
        replace(healthy("b", V2), status="unhealthy"),
        weights={"b": 100},
    )
    acts = reconcile(d, local, 2.0)
    assert Resume("a") in acts and Route({"a": 1, "b": 0}, None) in acts


def test_mirror_target_gets_no_weight_and_mirror_waits_for_health() -> None:
    """The shadow slot never gets weight; mirroring starts only once it is healthy."""
    m = MirrorSpec(slot="b", percent=10)
    d = desired(2, {"a": V1, "b": V2}, {"a": 100, "b": 100}, mirror=m)
    starting = SlotView(slot="b", status="starting", digest=V2.digest, since=1)
    assert reconcile(d, view(healthy("a", V1), starting, weights={"a": 100}), 2.0) == []
    acts = reconcile(d, view(healthy("a", V1), healthy("b", V2), weights={"a": 100}), 2.0)
    assert acts == [Route({"a": 100, "b": 0}, m)]


def test_mirror_is_removed_before_the_shadow_slot_drains() -> None:
    """Retiring a mirrored slot first removes the mirror, then drains."""
    m = MirrorSpec(slot="b", percent=10)
    d = desired(3, {"a": V1}, {"a": 100})
    local = view(healthy("a", V1), healthy("b", V2), weights={"a": 100}, mirror=m)
    assert reconcile(d, local, 1.0) == [Route({"a": 100, "b": 0}, None)]


def test_release_changed_in_the_serving_slot_uses_the_other_slot_as_bridge() -> None:
    """Desired replacing the only serving slot's release starts it in the free slot first."""
    d = desired(2, {"a": V2}, {"a": 100})
    assert reconcile(d, serving_v1(), 1.0) == [Start("b", V2, 2)]
    bridged = view(healthy("a", V1), healthy("b", V2), weights={"a": 100})
    assert reconcile(d, bridged, 2.0) == [Route({"a": 0, "b": 100}, None)]


def test_release_changed_in_a_slot_without_traffic_is_replaced_in_place() -> None:
    """A staged slot with no traffic is simply drained and restarted with the new release."""
    d = desired(2, {"a": V1, "b": V3}, {"a": 100})
    local = view(healthy("a", V1), healthy("b", V2), weights={"a": 100})
    assert reconcile(d, local, 1.0) == [Drain("b")]
    stopped = replace(
        local, slots={**local.slots, "b": SlotView(slot="b", status="stopped", digest=V2.digest)}
    )
    assert reconcile(d, stopped, 2.0) == [Start("b", V3, 2)]


def test_worker_starts_new_then_stops_old_without_routing() -> None:
    """A worker has no router: new slot healthy first, then the old is drained, never Route."""
    d = desired(2, {"b": V2}, {})
    local = view(healthy("a", V1), releases=WINFO)
    assert reconcile(d, local, 1.0) == [Start("b", V2, 2)]
    starting = replace(
        local,
        slots={
            **local.slots,
            "b": SlotView(slot="b", status="starting", digest=V2.digest, since=1),
        },
    )
    assert reconcile(d, starting, 2.0) == []
    both = replace(local, slots={**local.slots, "b": healthy("b", V2)})
    assert reconcile(d, both, 3.0) == [Drain("a")]


def test_holds_when_only_the_shadow_could_bridge() -> None:
    """Replacing the only serving slot while the other is a shadow keeps the old one serving."""
    d = desired(2, {"a": V2, "b": V1}, {"a": 100}, mirror=MirrorSpec(slot="b", percent=5))
    local = view(healthy("a", V1), healthy("b", V1), weights={"a": 100})
    acts = reconcile(d, local, 1.0)
    assert not any(isinstance(a, (Drain, Stop)) for a in acts)
    assert assess(d, local).phase == "converging"


def test_empty_desired_retires_everything() -> None:
    """Desired with no slots and no router left: drain, then stop (nothing is routed)."""
    d = desired(5, {}, {})
    assert reconcile(d, serving_v1(), 1.0) == [Drain("a")]
    assert reconcile(d, view(healthy("a", V1)), 1.0) == [Drain("a")]


def test_removal_closes_the_router_first_and_the_slots_keep_serving() -> None:
    """A removal asks the router to close and touches no slot until it is gone."""
    d = desired(5, {}, {})
    up = replace(serving_v1(), router="up")
    assert reconcile(d, up, 1.0) == [CloseRouter()]
    closing = replace(up, router="closing")
    assert reconcile(d, closing, 1.0) == []
    assert assess(d, closing).phase == "converging"


def test_removal_drains_and_stops_once_the_router_is_gone() -> None:
    """With the router gone (its weights forgotten or not), the slots drain and then stop."""
    d = desired(5, {}, {})
    gone = replace(serving_v1(), router="none")
    assert reconcile(d, gone, 1.0) == [Drain("a")]
    draining = view(replace(healthy("a", V1), status="draining", since=1.0))
    assert reconcile(d, draining, 2.0) == []
    assert reconcile(d, draining, 3.5) == [Stop("a", 10)]


def test_removal_converges_only_with_router_gone_and_slots_stopped() -> None:
    """A removal is converged once every slot is idle and no router runs."""
    d = desired(5, {}, {})
    stopped = view(replace(healthy("a", V1), status="stopped"))
    assert assess(d, stopped).phase == "converged"
    assert assess(d, stopped).observed_generation == 5
    assert assess(d, replace(stopped, router="up")).phase == "converging"
    assert assess(d, view(healthy("a", V1))).phase == "converging"


def test_a_worker_removal_stops_its_slots() -> None:
    """A worker has no router: its removal drains and stops the slot straight away."""
    d = desired(5, {}, {})
    worker = view(healthy("a", V1), releases=WINFO)
    assert reconcile(d, worker, 1.0) == [Drain("a")]


def test_a_deploy_after_a_removal_starts_again() -> None:
    """After a removal, a new desired state starts the release (the router comes with it)."""
    d = desired(6, {"a": V1}, {"a": 100})
    removed = view(replace(healthy("a", V1), status="stopped"))
    assert reconcile(d, removed, 1.0) == [Start("a", V1, 6)]


# -- property tests --------------------------------------------------------------------------------

REFS = [V1, V2, V3]
desired_st = st.builds(
    lambda gen, slots, weights, mirror: desired(
        gen,
        slots,
        {s: w for s, w in weights.items() if s in slots},
        MirrorSpec(slot=mirror, percent=10) if mirror and mirror in slots else None,
    ),
    st.integers(1, 5),
    st.dictionaries(st.sampled_from(SLOTS), st.sampled_from(REFS), max_size=2),
    st.dictionaries(st.sampled_from(SLOTS), st.integers(0, 100), max_size=2),
    st.none() | st.sampled_from(SLOTS),
)
outcome_st = st.sampled_from(["tick", "healthy", "unhealthy", "crash", "fetch_fail", "time"])
step_st = st.tuples(st.one_of(st.none(), desired_st), st.sampled_from(SLOTS), outcome_st)


def _apply(local: ServiceView, act: Action, now: float, worker: bool) -> ServiceView:
    slots = dict(local.slots)
    if isinstance(act, Fetch):
        info = ReleaseInfo(
            act.release.digest, port=None if worker else 8080, start_timeout=5, drain=1,
            restart_after=2,
        )
        return replace(local, releases={**local.releases, act.release.digest: info})
    if isinstance(act, Start):
        slots[act.slot] = SlotView(
            slot=act.slot,
            status="starting",
            digest=act.release.digest,
            since=now,
            generation=act.generation,
        )
    elif isinstance(act, Fail):
        slots[act.slot] = replace(local.slot(act.slot), status="failed", reason=act.reason)
    elif isinstance(act, Route):
        return replace(
            local,
            applied_weights={s: w for s, w in act.weights.items() if w > 0},
            applied_mirror=act.mirror,
            router="up",
        )
    elif isinstance(act, CloseRouter):
        return replace(local, applied_weights={}, applied_mirror=None, router="none")
    elif isinstance(act, Drain):
        slots[act.slot] = replace(local.slot(act.slot), status="draining", since=now)
    elif isinstance(act, Resume):
        slots[act.slot] = replace(local.slot(act.slot), status="healthy", since=now)
    elif isinstance(act, Stop):
        slots[act.slot] = replace(local.slot(act.slot), status="stopped", since=now)
    elif isinstance(act, Restart):
        cur = local.slot(act.slot)
        slots[act.slot] = replace(cur, status="stopped", since=now, heals=(*cur.heals, now))
    elif isinstance(act, Report):
        slots[act.slot] = replace(local.slot(act.slot), reason=act.reason)
    return replace(local, slots=slots)


def _outcome(local: ServiceView, slot: str, what: str, now: float) -> ServiceView:
    cur = local.slot(slot)
    new = cur
    if what == "healthy" and cur.status in ("starting", "unhealthy"):
        new = replace(cur, status="healthy", since=now)
    elif what == "unhealthy" and cur.status == "healthy":
        new = replace(cur, status="unhealthy", since=now)
    elif what == "crash" and cur.status in ("starting", "healthy", "unhealthy", "draining"):
        new = replace(cur, status="failed", reason="exit 1", since=now)
    elif what == "fetch_fail":
        missing = [d for d in (r.digest for r in REFS) if d not in local.releases]
        if missing:
            return replace(
                local, fetch_errors={**local.fetch_errors, missing[0]: FetchError("x", now)}
            )
    return replace(local, slots={**local.slots, slot: new})


def _check(d: DesiredState, local: ServiceView, acts: list[Action], worker: bool) -> None:
    healthy_slots = {s for s in SLOTS if local.slot(s).status == "healthy"}
    mirror = d.mirror.slot if d.mirror and not worker else None
    if mirror is not None and local.slot(mirror).digest != d.slots[mirror].digest:
        mirror = None  # that slot does not run the shadow release (yet)
    serve = (worker and bool(d.slots)) or any(
        w > 0 and s != (d.mirror.slot if d.mirror else None) for s, w in d.weights.items()
    )
    if local.router != "none" and not d.slots:
        # A removal: the router goes first; no slot is drained or stopped, nothing routed.
        assert acts in ([CloseRouter()], []), acts
    for act in acts:
        if isinstance(act, CloseRouter):
            assert not d.slots, "router closed while something is wanted"
        if isinstance(act, Resume):
            healthy_slots.add(act.slot)
        if isinstance(act, Route):
            for s, w in act.weights.items():
                assert w == 0 or s in healthy_slots, f"weight to {local.slot(s).status} slot {s}"
                assert not (w > 0 and s == mirror), "weight to the mirror target"
            if act.mirror is not None:
                assert act.mirror.slot in healthy_slots
            if healthy_slots - {mirror} and serve:
                assert any(w > 0 for w in act.weights.values()), "router left with nothing"
        if isinstance(act, Restart):
            assert local.slot(act.slot).status == "unhealthy", "restart of a slot not unhealthy"
            assert not local.applied_weights.get(act.slot), "restart of a slot with traffic"
        if isinstance(act, (Drain, Stop)) and serve:
            st_ = local.slot(act.slot).status
            if st_ in ("healthy", "draining"):
                others = healthy_slots - {act.slot, mirror}
                assert others, f"{type(act).__name__} of the last healthy slot {act.slot}"


@settings(max_examples=400, deadline=None)
@given(st.booleans(), st.lists(step_st, min_size=1, max_size=40))
def test_never_routes_to_unhealthy_nor_stops_last_healthy(worker: bool, steps) -> None:
    """Whatever desired states and process outcomes come, both safety promises hold."""
    now = 0.0
    d: DesiredState | None = None
    local = ServiceView(service="hello")
    for new_d, slot, outcome in steps:
        if new_d is not None and (d is None or new_d.generation >= d.generation):
            d = msgspec.structs.replace(new_d, generation=(d.generation + 1) if d else 1)
        now += 3.0 if outcome == "time" else 0.1
        local = _outcome(local, slot, outcome, now)
        for _ in range(3):
            acts = reconcile(d, local, now)
            if d is not None:
                _check(d, local, acts, worker)
            for act in acts:
                local = _apply(local, act, now, worker)


@settings(max_examples=200, deadline=None)
@given(st.booleans(), desired_st.filter(lambda d: bool(d.slots)))
def test_converges_when_every_process_becomes_healthy(worker: bool, d: DesiredState) -> None:
    """From a node serving V1, any safely reachable desired state is reached once slots are healthy.

    Not reachable safely: replacing the serving slot ``a`` while ``b`` is reserved as a shadow
    (nothing else may serve meanwhile); test_holds_when_only_the_shadow_could_bridge covers it.
    """
    assume(not (d.mirror and d.mirror.slot == "b" and "a" in d.slots and d.slots["a"] != V1))
    local = serving_v1()
    if worker:
        local = replace(local, releases=WINFO, applied_weights={})
    now = 0.0
    for _ in range(60):
        now += 1.0
        for act in reconcile(d, local, now):
            local = _apply(local, act, now, worker)
        for s in SLOTS:
            local = _outcome(local, s, "healthy", now)
        if assess(d, local).phase == "converged":
            break
    assert assess(d, local).phase == "converged", local


def test_every_slot_status_has_exactly_one_rule() -> None:
    """The slot table names every status a slot can report, and nothing else."""
    assert set(SLOT_RULES) == set(get_args(SlotStatusName))
