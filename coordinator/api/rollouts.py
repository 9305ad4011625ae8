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

The status dict is the one shape people and programs read (``fleetwave status -o json``)::

    {"id", "service", "version", "from_version", "strategy", "state", "reason", "phase",
     "created", "updated", "finished", "current_wave", "report", "bake", "gates",
     "on_failure", "on_node_lost", "started_by", "paused_by", "aborted_by", "rollback_by",
     "waves": [{"index", "nodes", "weight", "state", "started", "finished", "gates"}],
     "nodes": {id: {"version", "state", "healthy", "online", "wave", "generation", "slot",
                    "reason"}}}

where a wave's ``gates`` holds the figures and thresholds of its last evaluation, and the top-level
``gates`` (with ``bake``, seconds) the thresholds every wave is judged on; ``on_failure`` and
``on_node_lost`` are the rollout's policies (``RolloutSpec``); ``started_by`` ... ``rollback_by``
say who deployed, paused (while paused), aborted or rolled it back (``RolloutRecord``).

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
from coordinator.errors import RemoteError, UsageError
from coordinator.releases import UnknownRelease
from protocol import subjects
from protocol.cohort import describe
from protocol.messages import (
    TERMINAL_STATES,
    CohortSpec,
    DeployRequest,
    KeyRequest,
    ListRolloutsRequest,
    ReleaseRef,
    RollbackRequest,
    RolloutRecord,
    RolloutRequest,
    RolloutSpec,
)

Resolve = Callable[[str, str], Awaitable[ReleaseRef]]
MAX_LIMIT = 1000


class LiveRollout(Protocol):
    """A rollout driven by this coordinator (``coordinator.runtime.driver.Driver``)."""

    @property
    def id(self) -> str: ...


class Runner(Protocol):
    """What the verbs need of ``coordinator.runtime.runner.Runner`` (the API does not import
    the runtime: the daemon, in the runtime, wires the two together)."""

    fleet: str

    async def deploy(self, spec: RolloutSpec, release: ReleaseRef,
                     who: str) -> RolloutRecord: ...
    async def request(self, rollout_id: str, event: EngineEvent) -> RolloutRecord: ...
    async def get(self, rollout_id: str) -> RolloutRecord | None: ...
    async def records(self) -> list[RolloutRecord]: ...
    def active(self, service: str) -> LiveRollout | None: ...


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
        strategies.validate(req.spec)
        release = removal_ref(req.spec.service) if strategies.removes(req.spec) \
            else await self._release(req.spec.service, req.spec.version)
        record = await self.runner.deploy(req.spec, release, caller)
        return {"id": record.id}

    async def status(self, req: RolloutRequest, caller: str) -> dict[str, Any]:
        return status_dict(await self._find(req.id))

    async def rollouts(self, req: ListRolloutsRequest, caller: str) -> list[dict[str, Any]]:
        if req.service:
            subjects.check_name("service", req.service)
        limit = max(1, min(req.limit, MAX_LIMIT))
        records = [r for r in await self.runner.records()
                   if not req.service or r.spec.service == req.service]
        return [summary(r) for r in records[:limit]]

    def _verb(
        self, event: Callable[[RolloutRequest, str], EngineEvent]
    ) -> Callable[[RolloutRequest, str], Awaitable[dict[str, Any]]]:
        async def handler(req: RolloutRequest, caller: str) -> dict[str, Any]:
            rid = req.id or (await self._find("")).id
            return status_dict(await self.runner.request(rid, event(req, caller)))

        return handler

    async def rollback(self, req: RollbackRequest, caller: str) -> dict[str, Any]:
        service = subjects.check_name("service", req.service)
        live = self.runner.active(service)
        if live is not None:
            if req.to_version:
                raise RemoteError(
                    f"rollout {live.id} of {service} is running; roll it back with 'fleetwave "
                    f"rollback {service}' (without --to) or abort it first", "conflict")
            await self.runner.request(live.id, RollbackRequested(who=caller))
            return {"id": live.id, "action": "rolling back"}
        history = [r for r in await self.runner.records() if r.spec.service == service]
        if not history:
            raise UsageError(f"no rollout of {service} is known; deploy a version with "
                             f"'fleetwave deploy {service} VERSION'")
        running = [r for r in history if r.state not in TERMINAL_STATES]
        if running:
            raise RemoteError(f"rollout {running[0].id} of {service} is {running[0].state} but "
                              "driven by no coordinator here; try again in a moment", "conflict")
        last_good = next((r for r in history if r.state == "succeeded"), None)
        if strategies.removes(history[0].spec) and history[0].state != "rolled_back":
            # The latest rollout removed the service (from some nodes, if it was aborted or
            # failed): undo that, whatever came before it.
            last_good = history[0]
        version = req.to_version or (last_good.from_version if last_good else "")
        if not version:
            raise UsageError(f"no earlier version of {service} is known to roll back to; name "
                             f"one with 'fleetwave rollback {service} --to VERSION'")
        base = last_good or history[0]
        spec = msgspec.structs.replace(base.spec, version=version)
        if strategies.removes(base.spec):
            spec = undo_removal(base.spec, version)
        release = await self._release(service, version)
        record = await self.runner.deploy(spec, release, caller)
        return {"id": record.id, "action": f"deploying {service} {version}"}

    async def key(self, req: KeyRequest, caller: str) -> dict[str, Any]:
        return {"public_key": self.public_key}

    # -- helpers -----------------------------------------------------------------------------------

    async def _release(self, service: str, version: str) -> ReleaseRef:
        try:
            return await self._resolve(service, version)
        except UnknownRelease as exc:  # the operator named it: a usage error, exit 2
            raise UsageError(str(exc)) from None

    async def _find(self, rollout_id: str) -> RolloutRecord:
        if rollout_id:
            record = await self.runner.get(rollout_id)
        else:
            records = await self.runner.records()
            record = records[0] if records else None
        if record is None:
            what = f"rollout {rollout_id!r}" if rollout_id else "rollout"
            raise RemoteError(f"no {what} in fleet {self.runner.fleet!r}; list them with "
                              "'fleetwave rollouts'", "not_found")
        return record


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


def status_dict(r: RolloutRecord) -> dict[str, Any]:
    """The status of one rollout as people and programs read it (see the module docstring)."""
    return {
        "id": r.id, "service": r.spec.service, "version": r.release.version,
        "from_version": r.from_version, "strategy": r.spec.strategy, "state": r.state,
        "reason": r.reason, "phase": r.phase, "created": r.created, "updated": r.updated,
        "finished": r.finished, "current_wave": r.current_wave,
        "report": msgspec.to_builtins(r.report),
        "bake": r.spec.bake, "gates": msgspec.to_builtins(r.spec.gates),
        "on_failure": r.spec.on_failure, "on_node_lost": r.spec.on_node_lost,
        "started_by": r.started_by, "paused_by": r.paused_by, "aborted_by": r.aborted_by,
        "rollback_by": r.rollback_by,
        "cohort": _cohort(r.spec),
        "waves": [
            {"index": w.index, "nodes": list(w.nodes), "weight": w.weight, "state": w.state,
             "started": w.started, "finished": w.finished, "gates": dict(w.gates),
             "share": _share(r.spec, w.weight)}
            for w in r.waves
        ],
        "nodes": {
            n: {"version": p.version, "state": p.state, "healthy": p.healthy, "online": p.online,
                "wave": p.wave, "generation": p.generation, "slot": p.slot, "reason": p.reason}
            for n, p in r.nodes.items()
        },
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
    return {
        "id": r.id, "service": r.spec.service, "version": r.release.version,
        "from_version": r.from_version, "strategy": r.spec.strategy, "state": r.state,
        "reason": r.reason, "created": r.created, "finished": r.finished,
        "nodes": len(r.nodes), "waves": len(r.waves), "current_wave": r.current_wave,
        "started_by": r.started_by,
    }
