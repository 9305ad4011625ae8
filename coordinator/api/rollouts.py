"""The rollout verbs of the coordinator's API, on top of ``coordinator.runtime.runner``.

    deploy     DeployRequest(spec)            → {"id"}          usage: bad spec, unknown release,
                                                                nothing to remove
    status     RolloutRequest(id; "" latest)  → status dict     not_found
    rollouts   ListRolloutsRequest            → [summary]
    pause|resume|promote|abort  RolloutRequest → status dict    conflict: not in a state for it
    rollback   RollbackRequest(service, to)   → {"id", "action"}
    key        KeyRequest                     → {"public_key"}  (agents' --trust-key)

A removal (``fleetwave remove``) is a ``deploy`` whose spec has strategy ``remove`` and no
version: its record names the service with no version and no digest (``removal_ref``).

``rollback`` with a live rollout of the service asks it to roll back (the engine restores every
touched node); without one it deploys the version the fleet ran before its last successful rollout
(or ``to_version``) through the same runner path, with that rollout's settings. After a finished
removal (succeeded, or aborted or failed part-way) that is the version the removal took away,
deployed where it was removed (its selector), rolling at the removal's own pace
(``undo_removal``); nodes that still run it are done at once.

``rollouts``, ``status`` without an id and ``rollback`` read the history's indexes and at most
the one record they need (``coordinator.runtime.history``), never every record. A rollout that
retention reduced answers ``status`` with the same dict built from its summary (no waves, no
nodes) and ``"summarised": true``.

The status dict is the one shape people and programs read (``fleetwave status -o json``)::

    {"id", "service", "version", "from_version", "strategy", "state", "reason", "phase",
     "created", "updated", "finished", "current_wave", "report", "bake", "gates",
     "on_failure", "on_node_lost", "started_by", "paused_by", "aborted_by", "rollback_by",
     "prestage", "waves": [{"index", "nodes", "weight", "state", "started", "finished", "gates"}],
     "nodes": {id: {"version", "state", "healthy", "online", "wave", "generation", "slot",
                    "reason", "staged"}},
     "node_count", "node_states": {state: count}}

where a wave's ``gates`` holds the figures and thresholds of its last evaluation, and the top-level
``gates`` (with ``bake``, seconds) the thresholds every wave is judged on; ``on_failure`` and
``on_node_lost`` are the rollout's policies (``RolloutSpec``); ``started_by`` ... ``rollback_by``
say who deployed, paused (while paused), aborted or rolled it back (``RolloutRecord``);
``prestage`` how many waves ahead are staged, and a node's ``staged`` its pre-staging ("",
"staging", "staged", "failed").

A status asked with ``max_nodes`` (``fleetwave deploy`` following, the dashboard: a 50,000-node
rollout's full status is 7 MB and ~70 ms of the leader's CPU, polled four times a second) keeps
to that many rows when the rollout has more nodes: those in motion first (failed, rolling back,
offline, staging, then updating: a page of updating nodes never hides a failure), then wave
order, and each wave's first ``WAVE_IDS`` ids; a wave's ``node_count``, the top-level
``node_count`` and ``node_states`` count them all.

Every handler takes the caller (``coordinator.api.verbs``); the writing verbs hand it to the
runner, which records it as ``who`` on every event the request causes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from coordinator import strategies
from coordinator.api.verbs import Api
from coordinator.core.engine import Abort, EngineEvent, Pause, Promote, Resume, RollbackRequested
from coordinator.core.history import rollback_choice, row, summarise
from coordinator.errors import ConfigError, FleetwaveError, RemoteError, UsageError
from coordinator.releases import UnknownRelease
from coordinator.strategies.spec import without_ignored
from protocol import subjects
from protocol.cohort import describe
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.history import RolloutSummary, SummarisedRollout
from protocol.messages import (
    WAVE_IDS,
    CohortSpec,
    DeployRequest,
    KeyRequest,
    ListRolloutsRequest,
    NodeProgress,
    ReleaseRef,
    RollbackRequest,
    RolloutRecord,
    RolloutRequest,
    RolloutSpec,
)

Resolve = Callable[[str, str], Awaitable[ReleaseRef]]
MAX_LIMIT = 1000
# The refusals of a deploy that become a ``rollout.refused`` event (``RolloutsApi._refused``).
REFUSALS = frozenset({"usage", "conflict"})


class LiveRollout(Protocol):
    """A rollout driven by this coordinator (``coordinator.runtime.driver.Driver``)."""

    @property
    def id(self) -> str: ...

    @property
    def undo(self) -> bool: ...


class Runner(Protocol):
    """What the verbs need of ``coordinator.runtime.runner.Runner`` (the API does not import
    the runtime: the daemon, in the runtime, wires the two together)."""

    fleet: str

    async def deploy(self, spec: RolloutSpec, release: ReleaseRef, who: str, *,
                     undo: bool = False) -> RolloutRecord: ...
    async def request(self, rollout_id: str, event: EngineEvent) -> RolloutRecord: ...
    async def find(self, rollout_id: str, *, whole: bool = True,
                   seen: bool = False) -> RolloutRecord | SummarisedRollout | None: ...
    async def latest(self, *, seen: bool = False) -> RolloutRecord | SummarisedRollout | None: ...
    async def history(self, service: str = "", limit: int = 50) -> list[RolloutSummary]: ...
    def active(self, service: str) -> LiveRollout | None: ...
    def refused(self, verb: str, spec: RolloutSpec, who: str, reason: str, code: str) -> None: ...


class RolloutsApi:
    """The handlers; ``register(api)`` adds them to the coordinator's Api."""

    def __init__(self, runner: Runner, *, resolve: Resolve, public_key: str) -> None:
        self.runner = runner
        self._resolve = resolve
        self.public_key = public_key

    def register(self, api: Api) -> None:
        api.add("deploy", DeployRequest, self.deploy)
        api.add("status", RolloutRequest, self.status)
        api.add("rollouts", ListRolloutsRequest, self.rollouts)
        api.add("pause", RolloutRequest, self._verb(lambda r, who: Pause(who=who)))
        api.add("resume", RolloutRequest, self._verb(lambda r, who: Resume(who=who)))
        api.add("promote", RolloutRequest,
                self._verb(lambda r, who: Promote(full=r.full, who=who)))
        api.add("abort", RolloutRequest, self._verb(lambda r, who: Abort(who=who)))
        api.add("rollback", RollbackRequest, self.rollback)
        api.add("key", KeyRequest, self.key)

    # -- handlers ----------------------------------------------------------------------------------

    async def deploy(self, req: DeployRequest, caller: str) -> dict[str, Any]:
        try:
            strategies.validate(req.spec)
            release = removal_ref(req.spec.service) if strategies.removes(req.spec) \
                else await self._release(req.spec.service, req.spec.version)
            record = await self.runner.deploy(req.spec, release, caller)
        except (FleetwaveError, ProtocolError, BusError) as exc:
            self._refused("deploy", req.spec, caller, exc)
            raise
        return {"id": record.id}

    async def status(self, req: RolloutRequest, caller: str) -> dict[str, Any]:
        found = await self._find(req.id)
        if isinstance(found, SummarisedRollout):
            return summarised_dict(found)
        return status_dict(found, max_nodes=max(0, req.max_nodes))

    async def rollouts(self, req: ListRolloutsRequest, caller: str) -> list[dict[str, Any]]:
        if req.service:
            subjects.check_name("service", req.service)
        limit = max(1, min(req.limit, MAX_LIMIT))
        return [row(s) for s in await self.runner.history(req.service, limit)]

    def _verb(
        self, event: Callable[[RolloutRequest, str], EngineEvent]
    ) -> Callable[[RolloutRequest, str], Awaitable[dict[str, Any]]]:
        async def handler(req: RolloutRequest, caller: str) -> dict[str, Any]:
            if not req.id.strip():
                # Never "the newest rollout" (of whichever service): a script's empty variable
                # paused or aborted someone else's rollout.
                raise UsageError("name the rollout: its id, as 'fleetwave rollouts' lists them")
            return status_dict(await self.runner.request(req.id, event(req, caller)))

        return handler

    async def rollback(self, req: RollbackRequest, caller: str) -> dict[str, Any]:
        service = subjects.check_name("service", req.service)
        live = self.runner.active(service)
        if live is not None:
            if live.undo:
                # A retried or repeated rollback: rolling this one back would deploy the very
                # version the first request left.
                raise RemoteError(
                    f"rollout {live.id} already rolls {service} back (a 'fleetwave rollback'); "
                    f"follow it with 'fleetwave status {live.id}'", "conflict")
            if req.to_version:
                raise RemoteError(
                    f"rollout {live.id} of {service} is running; roll it back with 'fleetwave "
                    f"rollback {service}' (without --to) or abort it first", "conflict")
            await self.runner.request(live.id, RollbackRequested(who=caller))
            return {"id": live.id, "action": "rolling back"}
        version, spec = await self.rollback_plan(service, req.to_version)
        try:
            release = await self._release(service, version)
            record = await self.runner.deploy(spec, release, caller, undo=True)
        except (FleetwaveError, ProtocolError, BusError) as exc:
            self._refused("rollback", spec, caller, exc)
            raise
        return {"id": record.id, "action": f"deploying {service} {version}"}

    async def rollback_plan(self, service: str, to_version: str = "") -> tuple[str, RolloutSpec]:
        """The version ``rollback SERVICE`` deploys without a live rollout, and the settings it
        deploys it with (read off the service's index and one record)."""
        history = await self.runner.history(service, MAX_LIMIT)
        if not history:
            raise UsageError(f"no rollout of {service} is known; deploy a version with "
                             f"'fleetwave deploy {service} VERSION'")
        # After a finished removal, rollback undoes it (the version it took away).
        choice = rollback_choice(history, to_version, removal=strategies.removes_strategy)
        if choice.running is not None:
            raise RemoteError(f"rollout {choice.running.id} of {service} is "
                              f"{choice.running.state} but driven by no coordinator here; try "
                              "again in a moment", "conflict")
        if not choice.version:
            raise UsageError(f"no earlier version of {service} is known to roll back to; name "
                             f"one with 'fleetwave rollback {service} --to VERSION'")
        base = await self.runner.find(choice.base, whole=False)  # its spec is all it takes
        if base is None:
            raise RemoteError(f"rollout {choice.base} of {service} (whose settings a rollback "
                              "reuses) cannot be read; try again, or deploy with 'fleetwave "
                              f"deploy {service} {choice.version}'", "not_found")
        if strategies.removes(base.spec):
            return choice.version, undo_removal(base.spec, choice.version)
        # Without what its strategy ignores: a record an older coordinator accepted with such a
        # setting would have its rollback refused for it.
        return choice.version, msgspec.structs.replace(without_ignored(base.spec),
                                                       version=choice.version)

    async def key(self, req: KeyRequest, caller: str) -> dict[str, Any]:
        return {"public_key": self.public_key}

    # -- helpers -----------------------------------------------------------------------------------

    def _refused(self, verb: str, spec: RolloutSpec, caller: str, exc: Exception) -> None:
        """Tell the runner of a deploy refused before any wave ran, when a person cares: a
        spec, release or fleet that does not fit (``usage``), the service locked by another
        rollout (``conflict``). Not when no coordinator leads (``unavailable``: the CLI asks
        again), nor a deploy recorded whose start failed (``accepted``: it will start)."""
        code = refusal(exc)
        if code in REFUSALS:
            self.runner.refused(verb, spec, caller, str(exc), code)

    async def _release(self, service: str, version: str) -> ReleaseRef:
        try:
            return await self._resolve(service, version)
        except UnknownRelease as exc:  # the operator named it: a usage error, exit 2
            raise UsageError(str(exc)) from None

    async def _find(self, rollout_id: str) -> RolloutRecord | SummarisedRollout:
        """The rollout to show (``seen``: a stored one's nodes without their desired states)."""
        if rollout_id:
            record = await self.runner.find(rollout_id, seen=True)
        else:
            record = await self.runner.latest(seen=True)
        if record is None:
            what = f"rollout {rollout_id!r}" if rollout_id else "rollout"
            raise RemoteError(f"no {what} in fleet {self.runner.fleet!r}; list them with "
                              "'fleetwave rollouts'", "not_found")
        return record


def refusal(exc: Exception) -> str:
    """The API code ``exc`` is answered with (``coordinator.api.verbs``), as far as a
    refusal goes: "usage", "conflict", a RemoteError's own code, else ""."""
    if isinstance(exc, (UsageError, ConfigError, ProtocolError)):
        return "usage"
    if isinstance(exc, Conflict):
        return "conflict"
    if isinstance(exc, RemoteError):
        return exc.code
    return ""


def undo_removal(removal: RolloutSpec, version: str) -> RolloutSpec:
    """The deploy that undoes a finished removal: ``version`` (what it removed) where it removed
    it, rolling at its batch, max-unavailable and progress deadline. Not the last deploy's
    strategy: a shadow or a canary's steps mean nothing on nodes that run nothing."""
    return RolloutSpec(service=removal.service, version=version, strategy="rolling",
                       selector=dict(removal.selector), batch=removal.batch,
                       max_unavailable=removal.max_unavailable,
                       progress_deadline=removal.progress_deadline, on_failure=removal.on_failure)


def removal_ref(service: str) -> ReleaseRef:
    """What a removal's record names as its release: the service, no version, no digest."""
    return ReleaseRef(service=service, version="", digest="")


def status_dict(r: RolloutRecord, *, max_nodes: int = 0) -> dict[str, Any]:
    """The status of one rollout as people and programs read it (see the module docstring);
    with ``max_nodes``, at most that many node rows."""
    brief = 0 < max_nodes < len(r.nodes)
    states: dict[str, int] = {}
    for p in r.nodes.values():
        states[p.state] = states.get(p.state, 0) + 1
    shown = _shown(r, max_nodes) if brief else r.nodes
    return {
        "id": r.id, "service": r.spec.service, "version": r.release.version,
        "from_version": r.from_version, "strategy": r.spec.strategy, "state": r.state,
        "reason": r.reason, "phase": r.phase, "created": r.created, "updated": r.updated,
        "finished": r.finished, "current_wave": r.current_wave,
        "report": msgspec.to_builtins(r.report),
        "bake": r.spec.bake, "gates": msgspec.to_builtins(r.spec.gates),
        "on_failure": r.spec.on_failure, "on_node_lost": r.spec.on_node_lost,
        "started_by": r.started_by, "paused_by": r.paused_by, "aborted_by": r.aborted_by,
        "rollback_by": r.rollback_by, "prestage": r.prestage,
        "cohort": _cohort(r.spec),
        "waves": [
            {"index": w.index, "nodes": list(w.nodes[:WAVE_IDS] if brief else w.nodes),
             "node_count": len(w.nodes), "weight": w.weight, "state": w.state,
             "started": w.started, "finished": w.finished, "gates": dict(w.gates),
             "share": _share(r.spec, w.weight)}
            for w in r.waves
        ],
        "nodes": {
            n: _node_row(r.nodes[n]) for n in shown
        },
        "node_count": len(r.nodes), "node_states": states,
    }


def _node_row(p: NodeProgress) -> dict[str, Any]:
    return {"version": p.version, "state": p.state, "healthy": p.healthy, "online": p.online,
            "wave": p.wave, "generation": p.generation, "slot": p.slot, "reason": p.reason,
            "staged": p.staged}


def _shown(r: RolloutRecord, most: int) -> list[str]:
    """The ``most`` nodes a brief status shows: in motion first, the ones that want a look
    before the ones merely updating (failed, rolling back, offline, failed staging, staging),
    then the rest in wave order."""
    rank: dict[str, int] = {}
    for n, p in r.nodes.items():
        at = (0 if p.state == "failed" else 1 if p.state == "rolling_back"
              else 2 if not p.online else 3 if p.staged == "failed"
              else 4 if p.staged == "staging" else 5 if p.state == "updating" else -1)
        if at >= 0:
            rank[n] = at
    moving = sorted(rank, key=rank.__getitem__)  # stable: table order within a rank
    if len(moving) >= most:
        return moving[:most]
    chosen = set(moving)
    rest = (n for w in r.waves for n in w.nodes if n not in chosen and n in r.nodes)
    return moving + [n for n, _ in zip(rest, range(most - len(moving)), strict=False)]


def summarised_dict(r: SummarisedRollout) -> dict[str, Any]:
    """``status_dict``'s shape for a rollout that retention reduced: what its summary and spec
    say, no waves and no nodes, and ``"summarised": true``."""
    s, spec = r.summary, r.spec
    return {
        "id": s.id, "service": s.service, "version": s.version, "from_version": s.from_version,
        "strategy": s.strategy, "state": s.state, "reason": s.reason, "phase": "",
        "created": s.created, "updated": s.finished, "finished": s.finished,
        "current_wave": s.current_wave, "report": {}, "bake": spec.bake,
        "gates": msgspec.to_builtins(spec.gates), "on_failure": spec.on_failure,
        "on_node_lost": spec.on_node_lost, "started_by": s.started_by, "paused_by": "",
        "aborted_by": "", "rollback_by": "", "prestage": 0, "waves": [], "nodes": {},
        "summarised": True,
        "cohort": _cohort(spec),
        "node_count": s.nodes, "wave_count": s.waves, "node_states": {},
    }


def _cohort(spec: RolloutSpec) -> dict[str, Any] | None:
    """The cohort settings of a rollout (issue 15), or None when it splits by request."""
    if not (spec.cohort_key or spec.allow or spec.deny or spec.preview):
        return None
    return {"key": spec.cohort_key, "fallback": spec.cohort_fallback,
            "assign_cookie": spec.assign_cookie, "allow": list(spec.allow),
            "deny": list(spec.deny), "preview": list(spec.preview)}


def _share(spec: RolloutSpec, weight: int) -> str:
    """What a wave's weight means, for people: "20 % of users (header X-User; no key: client
    IP)" under a cohort key, with any allow/deny/preview rules; "" when it is a share of
    requests and there are no rules."""
    if _cohort(spec) is None:
        return ""
    return describe(CohortSpec(
        key=spec.cohort_key, new="a", fallback=spec.cohort_fallback,
        assign_cookie=spec.assign_cookie, allow=spec.allow, deny=spec.deny, preview=spec.preview,
    ), weight)


def summary(r: RolloutRecord) -> dict[str, Any]:
    """One row of ``fleetwave rollouts``."""
    return row(summarise(r))


