"""The agent's state file: what is saved, and how a restarted agent takes up where it was.

Theory of operation: the state file (``state.json``, written atomically) records per service the
accepted envelope and the replay floor, each slot's process (pid + create_time, so that a reused
pid is never mistaken for ours), the failed slots, and the router; and the fleet's size as the
leader's last pace said it (``desired.DesiredWatch.remembered_size``). It is saved after every pass
that changed it (``save``), and at once when a slot process starts (``save_now``, from the
manager's slot callback): a kill before the end of that pass must not leave a process the
restarted agent knows nothing of. On start ``restore`` verifies the remembered envelopes again,
adopts the slot processes that are still alive and finds each router again on its socket; slot
processes of this node that no record accounts for are orphans and are stopped, since the
reconciler will start what is wanted again. A slot record that names no possible process (a pid
of 0 or less, a port outside 1..65535: a damaged or hand-edited file that still decodes) is
skipped with one line, and its slot started again, as a corrupt file is set aside. A state file
written by another node or fleet (a data dir reused under another name: a cloned VM image, a
renamed node, a changed ``--fleet``) is ignored, and a remembered envelope sets the replay floor
and term only if it is addressed to this fleet, node and service: another's would refuse this
node's own desired states.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from agent.errors import RouterUnavailable
from agent.host.processes import find_orphans, stop_orphans
from agent.host.releases import ReleaseCache
from agent.host.slots import Notify, SlotRunner, SlotSpec
from agent.host.state import (
    AgentState,
    ServiceRecord,
    SlotRecord,
    flush_state,
    load_state,
    write_atomic,
)
from agent.manager.routing import RouterLink, check_user
from agent.manager.service import NodeConfig, Release, Service, Services, release_info
from agent.reconcile import (
    SlotView,
)
from agent.router.control import RouterClient
from protocol.errors import ProtocolError
from protocol.manifest import MANIFEST_NAME, load_manifest
from protocol.messages import (
    SLOTS,
    ReleaseRef,
    SignedEnvelope,
)
from protocol.signing import verify

log = logging.getLogger("fleetwave.agent.services")


class Restorer:
    """Saves the manager's ``services`` to the state file, and fills them from it on start."""

    def __init__(
        self, config: NodeConfig, services: Services, cache: ReleaseCache, routers: RouterLink,
        *, clock: Callable[[], float] = time.time,
        fleet_nodes: Callable[[], int] = lambda: 0,
        halted: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self.state_path = config.state_path
        self.services = services
        self.cache = cache
        self.routers = routers
        self.clock = clock
        self.fleet_nodes = fleet_nodes  # what to save of the fleet's size (AgentState)
        self.halted = halted  # the agent stops: an adopted slot that crashes is not started again
        self.restored_fleet_nodes = 0  # what the state file said of it (``restore``)
        self._saved = b""  # the state file's body as last written (all in the loop's thread)
        self._writes = 0  # state files written by this process
        # The generations accepted, per service, as last put on the disk (None: nothing by this
        # process yet), and as written since without a flush (None: nothing to flush).
        self._flushed: dict[str, int] | None = None
        self._unflushed: dict[str, int] | None = None

    def _snapshot(self) -> AgentState:
        services = {}
        for svc in self.services.values():
            slots = {
                s: SlotRecord(
                    slot=s,
                    status=r.status,
                    digest=r.spec.digest,
                    version=r.spec.manifest.version,
                    pid=r.pid if r.alive else None,
                    create_time=r.create_time if r.alive else None,
                    port=r.spec.port,
                    since=r.since,
                    restarts=r.restarts,
                    reason=r.reason,
                    generation=r.spec.generation,
                    last_exit=r.last_exit,
                    heals=svc.heals.get((s, r.spec.digest), []),
                )
                for s, r in svc.runners.items()
            }
            for s, v in svc.idle.items():
                if s not in slots:
                    slots[s] = SlotRecord(
                        slot=s,
                        status=v.status,
                        digest=v.digest,
                        version=v.version,
                        since=v.since,
                        restarts=v.restarts,
                        reason=v.reason,
                        generation=v.generation,
                        last_exit=v.last_exit,
                        heals=svc.heals.get((s, v.digest), []),
                    )
            services[svc.name] = ServiceRecord(
                service=svc.name,
                envelope=svc.envelope,
                generation=max(svc.floor, svc.desired.generation if svc.desired else 0),
                observed_generation=svc.observed_generation,
                slots=slots,
                router_pid=svc.router_pid,
                router_socket=str(self.routers.socket(svc.name)),
                router_weights=dict(svc.applied_weights),
            )
        return AgentState(node=self.config.node, fleet=self.config.fleet, services=services,
                          fleet_nodes=self.fleet_nodes())

    def save(self) -> None:
        """Write the state file if it changed since the last write: here and now, unflushed (a
        small file written beside the old one and renamed over it: a fraction of a millisecond),
        so that the report that follows a save never waits for the disk; ``flush`` puts it on
        the disk after, when that matters."""
        state = self._snapshot()
        body = msgspec.json.encode(state)
        if body != self._saved:
            self._put(state, body)

    def save_now(self, *, flush: bool = False) -> None:
        """Write the state file now (a slot's new pid); ``flush``: and on the disk, if the
        generations accepted are not there yet (on the way out)."""
        state = self._snapshot()
        self._put(state, msgspec.json.encode(state))
        if flush and self._unflushed is not None:
            flush_state(self.state_path)
            self._flushed, self._unflushed = self._unflushed, None

    def _put(self, state: AgentState, body: bytes) -> None:
        write_atomic(self.state_path, body, durable=False)
        self._saved = body
        self._writes += 1
        accepted = {name: rec.generation for name, rec in state.services.items()}
        self._unflushed = None if accepted == self._flushed else accepted

    async def flush(self) -> None:
        """Put the state file on the disk (fsync of the file and of its directory, in a worker
        thread) if the generations accepted changed since it last was.

        They are what must survive a power loss (the replay floor: a rebooted host refuses a
        desired state that is not newer). The rest (pids, statuses, weights, restart budgets)
        serves a restart of the agent alone, which the page cache survives; after a power loss
        the processes it names are gone. So a deploy flushes once per desired state accepted,
        not at every start, health change and switch (10 agents, one ``--prestage all``
        deploy: 28 flushes of 78 writes, where every write was flushed, each before the report
        that followed it), and after that report, not before: a power loss between the two
        leaves the file one generation behind what was reported, which refuses every replay the
        newer one would (a state one generation older is not newer than it either), and the
        host, rebooted, converges again from its desired states."""
        if self._unflushed is None:
            return
        accepted, writes = self._unflushed, self._writes
        await asyncio.to_thread(flush_state, self.state_path)
        if self._writes == writes:
            self._flushed, self._unflushed = accepted, None
        # else: a newer file was renamed in meanwhile, perhaps after this flush opened the older
        # one; _put decided what the newer needs (the next flush, if its generations differ).

    async def restore(self, on_slot: Notify) -> list[SlotRunner]:
        """Load the state file: accepted envelopes, slot processes to adopt (reporting to
        ``on_slot``), routers to find. Returns the adopted runners, for the caller to run."""
        state = await asyncio.to_thread(load_state, self.state_path)
        if not self._ours(state):
            return await self._stop_orphans([])
        self.restored_fleet_nodes = max(0, state.fleet_nodes)
        adopted: list[SlotRunner] = []
        for name, rec in state.services.items():
            svc = Service(name=name, observed_generation=rec.observed_generation)
            env, generation = rec.envelope, rec.generation
            if env is not None and not self._addressed_here(env, name):
                # Another node's (an older file, which named no node): its generation and term
                # say nothing of this node's desired states, so they set no floor here.
                log.warning("remembered desired state of %s is ignored: it is addressed to "
                            "fleet %r node %r service %r", name, env.fleet, env.node, env.service)
                env, generation = None, 0
            svc.floor = max(generation, env.generation if env else 0)
            if env is not None:
                try:
                    svc.desired = verify(
                        env,
                        self.config.trusted_keys,
                        fleet=self.config.fleet,
                        node=self.config.node,
                        service=name,
                        min_generation=env.generation - 1,
                        min_term=env.term,
                    )
                except ProtocolError as exc:
                    log.error("remembered desired state of %s is refused: %s", name, exc)
                # Kept even when refused (its key is no longer trusted: a rotated signing key):
                # nothing acts on it (no desired state), but the same state signed by a trusted
                # key is then recognised as a re-signature (``protocol.signing.resigns``).
                svc.envelope = env
            self.services[name] = svc
            for slot, srec in rec.slots.items():
                runner = self._adopt(svc, slot, srec, on_slot)
                if runner is not None:
                    adopted.append(runner)
            sock = self.routers.socket(name)
            if sock.exists():
                client = RouterClient(sock)
                try:
                    svc.router_pid = await client.ping()
                    stats = await client.stats()
                except RouterUnavailable as exc:
                    log.warning("router of %s not found again (%s); starting a new one", name, exc)
                else:
                    stats.time = self.clock()
                    svc.router, svc.router_stats = client, stats
                    svc.applied_weights = {s: w for s, w in stats.weights.items() if w > 0}
                    log.info("adopted router of %s (pid %s)", name, svc.router_pid)
                    check_user(name, svc.router_pid, self.routers.run_as)
        return await self._stop_orphans(adopted)

    def _ours(self, state: AgentState) -> bool:
        """Whether the state file was written by this node of this fleet ("" in an older
        file: not said, taken as ours). Another's (a data dir reused under another node id or
        fleet: a cloned VM image, a renamed node) is not restored: its floors and terms would
        refuse this node's own desired states, and its slots are not this node's."""
        for what, theirs, mine in (("node", state.node, self.config.node),
                                   ("fleet", state.fleet, self.config.fleet)):
            if theirs and theirs != mine:
                log.warning("the state file %s belonged to %s %r, not %r: it is ignored, and the "
                            "services converge from this node's desired states",
                            self.state_path, what, theirs, mine)
                return False
        return True

    def _addressed_here(self, env: SignedEnvelope, service: str) -> bool:
        return (env.fleet, env.node, env.service) == (self.config.fleet, self.config.node,
                                                      service)

    async def _stop_orphans(self, adopted: list[SlotRunner]) -> list[SlotRunner]:
        """Stop this node's slot processes other than ``adopted``; return ``adopted``."""
        keep = {r.pid for r in adopted if r.pid is not None}
        slots = [(r.spec.release_dir, r.spec.slot) for r in adopted]
        orphans = await asyncio.to_thread(find_orphans, self.cache.root, self.config.node, keep,
                                          slots)
        if orphans:
            # Started by our previous life after its last state save: nothing watches them and
            # the reconciler will start what is wanted again, so they must go.
            log.warning("stopping %d slot process(es) no state record accounts for: pids %s",
                        len(orphans), ", ".join(str(o.pid) for o in orphans))
            await asyncio.to_thread(stop_orphans, orphans)
        return adopted

    def _adopt(
        self, svc: Service, slot: str, rec: SlotRecord, on_slot: Notify
    ) -> SlotRunner | None:
        if rec.heals and rec.digest:
            svc.heals[(slot, rec.digest)] = list(rec.heals)
        if slot in SLOTS and rec.status == "failed" and rec.digest:
            svc.idle[slot] = SlotView(
                slot=slot,
                status="failed",
                digest=rec.digest,
                version=rec.version,
                since=rec.since,
                restarts=rec.restarts,
                reason=rec.reason,
                generation=rec.generation,
                last_exit=rec.last_exit,
            )
            return None
        if slot not in SLOTS or rec.pid is None or rec.create_time is None or not rec.digest:
            return None
        if (why := _unusable(rec)) is not None:
            log.warning("slot %s/%s of the state file is skipped: %s; it will be started again",
                        svc.name, slot, why)
            return None
        ref = ReleaseRef(service=svc.name, version=rec.version, digest=rec.digest)
        path = self.cache.path_for(ref)
        if path is None:
            return None
        try:
            manifest = load_manifest(path / MANIFEST_NAME)
        except ProtocolError:
            return None
        info = release_info(rec.digest, manifest)
        svc.releases[rec.digest] = Release(path, manifest, info, ref)
        spec = SlotSpec(
            service=svc.name,
            slot=slot,
            node=self.config.node,
            release_dir=path,
            manifest=manifest,
            digest=rec.digest,
            port=rec.port,
            log_dir=self.config.log_dir,
            run_as=self.config.run_as_for(svc.name),
            generation=rec.generation,
        )
        runner = SlotRunner.adopt(
            spec,
            rec.pid,
            rec.create_time,
            on_slot,
            status=rec.status,
            since=rec.since,
            restarts=rec.restarts,
            now=self.clock,
            halted=self.halted,
        )
        if runner is None:  # gone, or not this slot's process (adopt said which)
            return None
        svc.runners[slot] = runner
        log.info("adopted slot %s/%s pid %s", svc.name, slot, rec.pid)
        return runner


def _unusable(rec: SlotRecord) -> str | None:
    """Why a slot record cannot describe a process of ours (a damaged or hand-edited state file
    that still decodes), or None. Such a record is skipped as a corrupt file is set aside: the
    slot is started again, and a process of ours it hid is stopped as an orphan."""
    if rec.pid is not None and rec.pid <= 0:
        return f"pid {rec.pid} is not a process id"
    if rec.port is not None and not 1 <= rec.port <= 65535:
        return f"port {rec.port} is not a TCP port"
    return None
