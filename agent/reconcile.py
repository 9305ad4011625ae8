"""The agent's reconciler: a pure function from (desired, local view, now) to actions.

Theory of operation. The shell calls ``reconcile`` on every change and on a tick; it carries out
the returned actions, which change the local view, and calls again. Nothing here remembers
anything: every decision is made from the view (level-triggered), so calling twice with the same
input returns the same actions, and a restarted agent that rebuilt its view resumes where it was.

Make-before-break, in the order the actions come out over successive calls:

    Fetch(release) → Start(slot) → [slot becomes healthy] → Route(weights) → Drain(old)
    → [stop.drain elapses] → Stop(old)

Vocabulary:
- *target weights*: what the router should apply now. Desired weights restricted to slots that are
  healthy and run the desired release. When none of those is healthy, the slots that are healthy
  now keep serving (the *fallback*), so the router is never left without a healthy slot while one
  exists. A slot that is not healthy never gets weight; the mirror target never gets weight.
- *retiring* a slot: it is running but not wanted (absent from desired, or running another
  release). It may only be drained once the router gives it no weight and no mirror, and only
  stopped once it is out of the target weights, so the last healthy serving slot stays up until
  its replacement is healthy.
- *bridge*: when desired changes the release of the slot that alone serves, the new release is
  started in the other slot (if desired leaves it free) and inherits the weight; once it serves,
  the original slot is replaced and the bridge retired. The coordinator normally avoids this by
  putting new releases in the idle slot; the bridge keeps the agent safe when it does not.
- *worker*: a service without a port has no router; a healthy slot is serving by being up, and
  the same ordering applies (start new, healthy, stop old).
- *removal*: a desired state with no slots ("nothing here", ``fleetwave remove``) retires the
  router first (``CloseRouter``: it stops accepting, finishes what is in flight, exits) while the
  slots still serve those requests; only once it is gone are the slots drained and stopped, so a
  client sees answers and then a refused connection, never an error from a router left without
  slots. The agent has converged on it once the router is gone and every slot is stopped.

Failures: a slot still ``starting`` after ``health.start_timeout`` gets ``Fail``; a slot that
failed is not started again for the same generation (a new generation retries). Failed fetches
are retried after ``FETCH_RETRY`` seconds and reported meanwhile.

Self-healing: a wanted slot ``unhealthy`` (it was healthy: a slot never healthy is
``start_timeout``'s business) for ``health.restart_after`` is *due* a restart, make-before-break.
If the other slot is free, a fresh process of the same release is started there (a *heal bridge*,
like the bridge above) and the hung slot gets ``Restart`` only once the router gives the bridge
weight; if the other slot is taken (both desired) or cannot take the bridge, the hung slot has no
traffic anyway and is restarted in place. ``Restart`` stops it; ``Start`` follows as for any
stopped slot; once it is healthy again traffic returns to it and the bridge is retired. The wait
backs off and is budgeted per slot (``agent.backoff``: ``restart_after * 2**n`` for the n-th
restart within ``HEAL_WINDOW``, at most ``HEAL_RESTARTS`` there); the times come from the view
(``SlotView.heals``). A slot due a restart with the budget spent gets ``Report`` once (a *restart
loop*: its reason says so, ``assess`` fails the state with it) and stays as it is until the
window frees a restart or it recovers.

Maintenance: a desired ``drain`` (``fleetwave drain``) goes to the router with the weights
(``Route.drain``; the router orders the rest: 503 on its readiness path, then after the grace no
more accepting); the slots are left as they are, so that undraining is one ``Route`` away.

Everything that affects the reconciler's decisions lives in this file (so it runs past 400
lines): the view, the actions, the weights, and the slot table ``SLOT_RULES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.backoff import Backoff
from protocol.durations import format_duration
from protocol.messages import (
    SLOTS,
    CohortSpec,
    DesiredState,
    DrainSpec,
    MirrorSpec,
    ReleaseRef,
    SlotStatusName,
)

FETCH_RETRY = 5.0
HEAL_RESTARTS = 3  # restarts of one slot for staying unhealthy, within HEAL_WINDOW
HEAL_WINDOW = 600.0
HEAL_WAIT_MAX = 600.0  # the back-off's cap (or restart_after, if longer)
LOOP = "restart loop"  # how a slot's reason starts once its restart budget is spent
RUNNING: frozenset[str] = frozenset({"starting", "healthy", "unhealthy", "draining"})
IDLE: frozenset[str] = frozenset({"empty", "stopped", "failed"})


RouterState = Literal["none", "up", "closing"]


# -- the local view --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotView:
    """One slot as the agent sees it; ``generation``: the desired generation it started for."""

    slot: str
    status: SlotStatusName = "empty"
    digest: str = ""
    version: str = ""
    since: float = 0.0
    restarts: int = 0
    reason: str = ""
    generation: int = 0
    last_exit: int | None = None
    heals: tuple[float, ...] = ()  # when it was restarted for staying unhealthy (self-healing)


@dataclass(frozen=True)
class ReleaseInfo:
    """What the reconciler needs from a fetched release's manifest."""

    digest: str
    port: int | None = None
    start_timeout: float = 30.0
    drain: float = 2.0
    stop_timeout: float = 10.0
    restart_after: float = 0.0  # health.restart_after; 0: never restarted for being unhealthy


@dataclass(frozen=True)
class FetchError:
    reason: str
    at: float
    # A bus outage: retried every FETCH_RETRY and not a failure of the node (the coordinator's
    # progress deadline bounds the wait); anything else fails the generation at once.
    transient: bool = False


@dataclass(frozen=True)
class ServiceView:
    """Everything the agent knows locally about one service."""

    service: str
    slots: Mapping[str, SlotView] = field(default_factory=dict)
    releases: Mapping[str, ReleaseInfo] = field(default_factory=dict)  # fetched, by digest
    fetching: frozenset[str] = frozenset()
    fetch_errors: Mapping[str, FetchError] = field(default_factory=dict)
    applied_weights: Mapping[str, int] = field(default_factory=dict)  # as the router has them
    applied_mirror: MirrorSpec | None = None
    applied_drain: DrainSpec | None = None  # the drain the router has (``fleetwave drain``)
    applied_cohort: CohortSpec | None = None  # the cohort rule the router has (issue 15)
    observed_generation: int = 0
    router_failure: str = ""  # why the router has not taken its configuration for a while
    # The service's router process: "up" (known and answering), "closing" (asked to drain and
    # exit, not gone yet) or "none".
    router: RouterState = "none"

    def slot(self, name: str) -> SlotView:
        return self.slots.get(name) or SlotView(slot=name)


# -- actions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    release: ReleaseRef


@dataclass(frozen=True)
class Start:
    slot: str
    release: ReleaseRef
    generation: int


@dataclass(frozen=True)
class Fail:
    slot: str
    reason: str


@dataclass(frozen=True)
class Route:
    """Apply these weights (every slot named, 0 for no traffic) and this mirror; ``drain``
    takes the router out of service (its readiness path says 503, then it stops accepting)."""

    weights: Mapping[str, int]
    mirror: MirrorSpec | None
    drain: DrainSpec | None = None
    cohort: CohortSpec | None = None  # a canary by users, allow/deny or preview rules


@dataclass(frozen=True)
class CloseRouter:
    """Nothing is wanted here any more: the router stops accepting, lets in-flight requests
    finish (up to its drain timeout) and exits; the slots serve until it is gone."""


@dataclass(frozen=True)
class Drain:
    slot: str


@dataclass(frozen=True)
class Resume:
    """A draining slot is needed again (its replacement went away): back to healthy."""

    slot: str


@dataclass(frozen=True)
class Stop:
    slot: str
    timeout: float


@dataclass(frozen=True)
class Restart:
    """Self-healing: stop a wanted slot that stayed unhealthy (``Start`` follows); an event."""

    slot: str
    timeout: float
    reason: str


@dataclass(frozen=True)
class Report:
    """A wanted slot is in a restart loop: record ``reason`` on it (and emit it) once."""

    slot: str
    reason: str


Action = Fetch | Start | Fail | Route | CloseRouter | Drain | Resume | Stop | Restart | Report


@dataclass(frozen=True)
class Assessment:
    """What the observed state says: the phase, its error, and the generation converged on."""

    phase: Literal["converging", "converged", "failed"]
    error: str
    observed_generation: int


# -- decisions -------------------------------------------------------------------------------------


def is_worker(desired: DesiredState | None, local: ServiceView) -> bool:
    """A worker's releases have no port; known once fetched (desired ones first, else running)."""
    digests = [r.digest for r in desired.slots.values()] if desired else []
    infos = [local.releases[d] for d in digests if d in local.releases]
    if not infos:
        infos = [
            local.releases[v.digest] for v in local.slots.values()
            if v.status in RUNNING and v.digest in local.releases
        ]
    return bool(infos) and all(i.port is None for i in infos)


def effective(
    desired: DesiredState, local: ServiceView, now: float | None = None
) -> dict[str, tuple[ReleaseRef, int]]:
    """Desired releases and weights per slot, plus a bridge slot where one is needed (heal
    bridges only given ``now``)."""
    worker = is_worker(desired, local)
    eff: dict[str, tuple[ReleaseRef, int]] = {
        s: (ref, 1 if worker else max(0, desired.weights.get(s, 0)))
        for s, ref in desired.slots.items()
        if s in SLOTS
    }
    for s, (ref, w) in list(eff.items()):
        other = _other(s)
        cur = local.slot(s)
        if other in desired.slots or cur.digest == ref.digest or cur.status != "healthy":
            continue
        if not (worker or local.applied_weights.get(s, 0) > 0):
            continue  # not serving: it can simply be replaced
        o = local.slot(other)
        if (o.digest == ref.digest and o.status in RUNNING) or o.status in IDLE:
            eff[other] = (ref, w)
    if now is not None:
        for s, (ref, w) in list(eff.items()):
            if s in desired.slots and heal_due(local, s, ref, now) is not None and (
                _can_bridge(desired, local, _other(s), ref)
            ):
                eff[_other(s)] = (ref, w)
    return eff


def heal_due(local: ServiceView, slot: str, want: ReleaseRef, now: float) -> float | None:
    """How long ``slot`` has been unhealthy, if it is due a restart for it (its back-off waited,
    its budget not spent); else None."""
    cur = local.slot(slot)
    info = local.releases.get(cur.digest)
    if cur.status != "unhealthy" or cur.digest != want.digest or info is None:
        return None
    wait = heal_wait(cur, info, now)
    return now - cur.since if wait is not None and now - cur.since >= wait else None


def heal_wait(cur: SlotView, info: ReleaseInfo, now: float) -> float | None:
    """How long ``cur`` must stay unhealthy before its next restart; None: off or budget spent."""
    if info.restart_after <= 0:
        return None
    policy = _heal_policy(info)
    return policy.delay(len(policy.recent(cur.heals, now)))


def _heal_policy(info: ReleaseInfo) -> Backoff:
    return Backoff(HEAL_RESTARTS, HEAL_WINDOW, info.restart_after,
                   max(info.restart_after, HEAL_WAIT_MAX))


def _can_bridge(desired: DesiredState, local: ServiceView, slot: str, ref: ReleaseRef) -> bool:
    """``slot`` may run a heal bridge of ``ref``: not desired, and free or running ``ref``."""
    if slot in desired.slots:
        return False
    o = local.slot(slot)
    if o.digest == ref.digest and o.status in RUNNING:
        return True
    return o.status in IDLE and not _failed_for(o, ref, desired.generation)


def target_weights(
    desired: DesiredState, local: ServiceView, now: float | None = None
) -> dict[str, int]:
    """Weights the router should apply now: only healthy slots, never the mirror target."""
    eff = effective(desired, local, now)
    m = target_mirror_slot(desired, local)
    mirror = m if m in desired.slots else None
    out = {
        s: w
        for s, (ref, w) in eff.items()
        if w > 0 and s != mirror and _ready(local.slot(s), ref.digest)
    }
    if out or not any(w > 0 and s != mirror for s, (_r, w) in eff.items()):
        return out  # (or nothing is meant to serve: an empty or all-zero desired state)
    # Fallback: nothing meant to serve is ready; what is healthy now keeps serving, preferring
    # slots that already run their desired release (they need no replacement, so the others
    # can be replaced), and a slot being drained is taken back rather than leave nothing.
    # The mirror slot is excluded only while it runs the shadow release.
    shadow = None
    if mirror and local.slot(mirror).digest == desired.slots[mirror].digest:
        shadow = mirror
    settled = [s for s in SLOTS if s in eff and local.slot(s).digest == eff[s][0].digest]
    healthy = [s for s in SLOTS if s != shadow and local.slot(s).status == "healthy"]
    groups = (
        [s for s in healthy if s in settled],
        [s for s in healthy if s not in settled],
        [s for s in SLOTS if s != shadow and local.slot(s).status == "draining"],
    )
    for group in groups:
        kept = {s: local.applied_weights.get(s, 0) for s in group}
        kept = {s: w for s, w in kept.items() if w > 0}
        if kept:
            return kept
        if group:
            return dict.fromkeys(group, 1)
    return {}


def target_mirror_slot(desired: DesiredState, local: ServiceView) -> str | None:
    """The slot desired as shadow; workers have no router and so no mirror."""
    m = desired.mirror
    if m is None or m.slot not in desired.slots or is_worker(desired, local):
        return None
    return m.slot


def target_mirror(desired: DesiredState, local: ServiceView) -> MirrorSpec | None:
    """The desired mirror, once its slot is healthy on the desired release."""
    m = desired.mirror
    if m is None or target_mirror_slot(desired, local) is None:
        return None
    if _ready(local.slot(m.slot), desired.slots[m.slot].digest):
        return m
    return None


@dataclass(frozen=True)
class SlotCase:
    """One slot in one pass, as its status's rule sees it."""

    name: str
    cur: SlotView
    want: ReleaseRef | None  # the release wanted in this slot (bridges included), if any
    info: ReleaseInfo | None  # the manifest's figures of the release the slot runs, if fetched
    release_local: bool  # the wanted release is fetched
    target: int  # the weight the router should give the slot now
    applied: int  # the weight the router gives it now
    mirrored: bool  # the router copies requests to it (never for a worker)
    generation: int  # the desired generation
    now: float
    heal: Restart | Report | None = None  # self-healing's decision for this slot, if any

    @property
    def wanted_here(self) -> bool:
        """The slot runs the release wanted in it."""
        return self.want is not None and self.cur.digest == self.want.digest

    @property
    def stop_timeout(self) -> float:
        return self.info.stop_timeout if self.info else 10.0


def _starting(c: SlotCase) -> Action | None:
    if c.wanted_here:
        limit = c.info.start_timeout if c.info else 30.0
        if c.now - c.cur.since >= limit:
            return Fail(c.name, f"not healthy within {limit:g}s (health.start_timeout)")
        return None
    return Stop(c.name, c.stop_timeout) if c.target == 0 else None


def _up(c: SlotCase) -> Action | None:
    if c.wanted_here:
        return c.heal
    if c.target > 0:
        return None
    return Drain(c.name) if c.applied == 0 and not c.mirrored else None


def _draining(c: SlotCase) -> Action | None:
    if c.target > 0 or c.wanted_here:
        return Resume(c.name)
    drain = c.info.drain if c.info else 2.0
    return Stop(c.name, c.stop_timeout) if c.now - c.cur.since >= drain else None


def _moving(_c: SlotCase) -> Action | None:
    return None  # a stop or a fetch under way ends with a slot event: wait for it


def _idle(c: SlotCase) -> Action | None:
    if c.want is None or _failed_for(c.cur, c.want, c.generation) or not c.release_local:
        return None
    return Start(c.name, c.want, c.generation)


# What a slot in each status may be asked to do, and when (at most one action per pass). A reader
# checks every slot decision here; the router's weights are decided before, in ``target_weights``.
#
#   status               action   when
#   empty/stopped/failed Start    a release is wanted here and fetched, and the slot did not fail
#                                 with it for this generation
#   starting             Fail     it runs the wanted release and health.start_timeout passed
#                        Stop     it runs an unwanted release and the router gives it no weight
#   healthy/unhealthy    Drain    it is not wanted, not in the target weights, and the router
#                                 neither gives it weight nor mirrors to it
#   unhealthy            Restart  it is wanted, due a restart (``heal_due``), and the router gives
#                                 another slot weight or no heal bridge is possible (``_heal``)
#                        Report   it is due a restart but the budget is spent, not reported yet
#   draining             Resume   it is wanted again, or in the target weights again
#                        Stop     stop.drain passed since it started draining
#   stopping/fetching    -        wait for the slot event that ends it
SLOT_RULES: dict[SlotStatusName, Callable[[SlotCase], Action | None]] = {
    "empty": _idle,
    "stopped": _idle,
    "failed": _idle,
    "starting": _starting,
    "healthy": _up,
    "unhealthy": _up,
    "draining": _draining,
    "stopping": _moving,
    "fetching": _moving,
}


def reconcile(desired: DesiredState | None, local: ServiceView, now: float) -> list[Action]:
    """The actions that move ``local`` one safe step towards ``desired`` at time ``now``."""
    if desired is None:
        return []
    if not desired.slots and local.router != "none":
        # Removal: the router goes first, the slots serve what it finishes (module docstring).
        return [CloseRouter()] if local.router == "up" else []
    worker = is_worker(desired, local)
    eff = effective(desired, local, now)
    actions: list[Action] = []

    # 1. releases: fetch what a wanted slot needs.
    for ref, _w in eff.values():
        if ref.digest in local.releases or ref.digest in local.fetching:
            continue
        err = local.fetch_errors.get(ref.digest)
        if err is not None and now - err.at < FETCH_RETRY:
            continue
        if not any(isinstance(a, Fetch) and a.release.digest == ref.digest for a in actions):
            actions.append(Fetch(ref))

    # 2. the router: weights and mirror.
    target = target_weights(desired, local, now)
    mirror = target_mirror(desired, local)
    applied = dict(target) if worker or not desired.slots else {
        s: w for s, w in local.applied_weights.items() if w > 0}  # (a removal: no router left)
    drain = None if worker else desired.drained
    cohort = None if worker else desired.cohorts
    # Never for a removal: a Route would start a router again for a service that has none.
    route_needed = not worker and bool(desired.slots) and (
        applied != target or local.applied_mirror != mirror or local.applied_drain != drain
        or local.applied_cohort != cohort)

    # 3. each slot: the rule of its status (SLOT_RULES).
    for name in SLOTS:
        cur = local.slot(name)
        want = eff.get(name)
        case = SlotCase(
            name=name,
            cur=cur,
            want=want[0] if want is not None else None,
            info=local.releases.get(cur.digest),
            release_local=want is not None and want[0].digest in local.releases,
            target=target.get(name, 0),
            applied=applied.get(name, 0),
            mirrored=mirror_on(local, name) and not worker,
            generation=desired.generation,
            now=now,
            heal=_heal(desired, local, name, applied, now),
        )
        action = SLOT_RULES[cur.status](case)
        if action is not None:
            actions.append(action)
    if route_needed:
        # After any Resume (a resumed slot is healthy again), before any Drain (which needs the
        # router to have moved traffic away already, so it never comes in the same batch).
        first = [a for a in actions if isinstance(a, Fetch | Resume)]
        rest = [a for a in actions if not isinstance(a, Fetch | Resume)]
        route = Route({s: target.get(s, 0) for s in SLOTS}, mirror, drain, cohort)
        actions = [*first, route, *rest]
    return actions


def _heal(
    desired: DesiredState, local: ServiceView, slot: str, applied: Mapping[str, int], now: float
) -> Restart | Report | None:
    """Self-healing's decision for a desired ``slot`` (see the module docstring)."""
    want = desired.slots.get(slot)
    cur = local.slot(slot)
    info = local.releases.get(cur.digest)
    if want is None or info is None or cur.status != "unhealthy" or cur.digest != want.digest:
        return None
    if info.restart_after <= 0 or now - cur.since < info.restart_after:
        return None
    unhealthy_for = heal_due(local, slot, want, now)
    if unhealthy_for is None:
        if heal_wait(cur, info, now) is not None or cur.reason.startswith(LOOP):
            return None  # backing off, or the loop is reported already
        made = len(_heal_policy(info).recent(cur.heals, now))
        window, after = format_duration(HEAL_WINDOW), format_duration(info.restart_after)
        return Report(slot, (
            f"{LOOP}: unhealthy again after {made} restarts within {window} "
            f"(health.restart_after {after}); not restarted again until the oldest is {window} "
            f"old; last: {cur.reason or 'probe failed'}"
        ))
    other = _other(slot)
    served_elsewhere = any(w > 0 for s, w in applied.items() if s != slot)
    if not served_elsewhere and _can_bridge(desired, local, other, want):
        return None  # make-before-break: the bridge in the other slot serves first
    made = len(_heal_policy(info).recent(cur.heals, now))
    return Restart(slot, info.stop_timeout, (
        f"unhealthy for {format_duration(unhealthy_for)} (health.restart_after "
        f"{format_duration(info.restart_after)}): restart {made + 1} of at most {HEAL_RESTARTS} "
        f"within {format_duration(HEAL_WINDOW)}; last: {cur.reason or 'probe failed'}"
    ))


def mirror_on(local: ServiceView, slot: str) -> bool:
    return local.applied_mirror is not None and local.applied_mirror.slot == slot


def assess(desired: DesiredState | None, local: ServiceView) -> Assessment:
    """Phase, error and observed generation for the observed state."""
    if desired is None:
        return Assessment("converged", "", local.observed_generation)
    errors: list[str] = []
    for s, ref in sorted(desired.slots.items()):
        cur = local.slot(s)
        if _failed_for(cur, ref, desired.generation):
            errors.append(f"slot {s} ({ref.version}) failed: {cur.reason}")
        elif cur.status == "unhealthy" and cur.reason.startswith(LOOP):
            errors.append(f"slot {s} ({ref.version}) is in a {cur.reason}")
        err = local.fetch_errors.get(ref.digest)
        if err is not None and not err.transient and ref.digest not in local.releases:
            errors.append(f"release {ref.service} {ref.version} cannot be fetched: {err.reason}")
    if local.router_failure:
        errors.append(f"router: {local.router_failure}")
    if errors:
        return Assessment("failed", "; ".join(errors), local.observed_generation)
    if converged(desired, local):
        return Assessment("converged", "", desired.generation)
    return Assessment("converging", "", local.observed_generation)


def converged(desired: DesiredState, local: ServiceView) -> bool:
    """Everything desired is true: slots healthy, weights and mirror applied, the rest stopped."""
    for s in SLOTS:
        cur = local.slot(s)
        ref = desired.slots.get(s)
        if ref is None:
            if cur.status not in IDLE:
                return False
        elif not _ready(cur, ref.digest):
            return False
    if not desired.slots:
        return local.router == "none"  # a removal: done once the router is gone too
    if is_worker(desired, local):
        return True
    want = {s: w for s, w in desired.weights.items() if w > 0 and s in desired.slots}
    if desired.mirror is not None and desired.mirror.slot in want:
        want.pop(desired.mirror.slot)
    have = {s: w for s, w in local.applied_weights.items() if w > 0}
    return (have == want and local.applied_mirror == desired.mirror
            and local.applied_drain == desired.drained
            and local.applied_cohort == desired.cohorts)


# -- helpers ---------------------------------------------------------------------------------------


def _other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def _ready(cur: SlotView, digest: str) -> bool:
    return cur.status == "healthy" and cur.digest == digest


def _failed_for(cur: SlotView, ref: ReleaseRef, generation: int) -> bool:
    """This slot already failed with this release for this generation: do not retry it."""
    return cur.status == "failed" and cur.digest == ref.digest and cur.generation >= generation
