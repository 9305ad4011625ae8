"""Slots: one service process per slot, supervised, that outlives the agent.

Theory of operation. A ``SlotRunner`` owns one slot's process from start to stop:

    starting ── pre_start hook ─ spawn ─ probes pass ─ validate hook ──▶ healthy ⇄ unhealthy
        │ crash: restart after backoff (status starting, restarts += 1)
        │ crash loop (CRASH_LOOP_RESTARTS within CRASH_LOOP_WINDOW), failing hook ──▶ failed
    draining (set by the shell; the process keeps running) ── stop() ──▶ stopping ──▶ stopped
    (stop() or fail() while a hook runs ends the hook as it ends the service: SIGTERM, SIGKILL)
    (a stop's SIGKILL goes to whatever of the group outlives the timeout, leader or worker; a
    crashed leader's group is SIGKILLed before the restart: a worker left would keep the port)
    (what a hook or exec probe leaves in its group is ended when it exits: end_leftovers)

The process is started with argv (never a shell; ``${PORT}`` and the other variables of
``SlotSpec.variables`` filled in by ``protocol.expand``, as in the hooks' and exec probe's argv)
in the release directory, in a new session so that it survives the agent (``kill -9`` of the
agent drops no request). Its output goes straight to a log file, not to a pipe: a pipe would
break when the agent dies. The agent caps the log from its side (``cap_log``: the tail is kept
in ``<log>.1`` and the live file truncated; the service opened it with O_APPEND, so its next
write lands at the new end).

Adoption: a restarted agent rebuilds runners from its state file with ``SlotRunner.adopt``, which
accepts a pid only if psutil's create_time matches the recorded one (never a recycled pid) and
the process looks like this slot's (``processes.not_the_slot``: session leader, started in the
release directory, this node's and slot's ``FLEETWAVE_*``): the runner signals the process group
of what it adopts, and a state file could name any process. A process refused is not the
runner's (one log line says why) and the slot counts as gone; only if it is one of this node's
slot processes after all is it stopped, as an orphan (``processes.find_orphans``). An adopted
process is not our child, so it is watched by polling psutil and its exit status is not known
(init reaps it).

The runner never raises out of ``run``: a bug becomes a ``failed`` slot with the reason, so one
slot cannot take the agent down. Cancelling ``run`` stops watching but leaves the process alive.

Why one long module: a slot's whole life cycle (spawn, probe, validate, crash policy, drain,
stop, adoption) is one state machine in one class, which reads best in one place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil

from agent.backoff import Backoff
from agent.cadence import next_tick
from agent.host import child
from agent.host.identity import RunAs, child_env, spawn_kwargs
from agent.host.probes import Prober, kill_and_reap, spawn_owned
from agent.host.processes import (
    KILL_WAIT,
    RELEASE_VAR,
    end_group,
    end_leftovers,
    group_alive,
    killpg,
    not_the_slot,
    process_matches,
    runs_as,
)
from protocol.errors import ProtocolError
from protocol.expand import expand_argv
from protocol.logs import last_line
from protocol.loop import bounded
from protocol.manifest import Manifest
from protocol.messages import SlotStatusName

log = logging.getLogger("fleetwave.agent.slots")

CRASH_LOOP_RESTARTS = 5
CRASH_LOOP_WINDOW = 60.0
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0
LOG_MAX_BYTES = 10 * 1024 * 1024
ADOPTED_POLL = 0.2
LOG_CAP_EVERY = 5.0

_LIVE: dict[str, SlotStatusName] = {
    "starting": "starting", "healthy": "healthy", "unhealthy": "unhealthy", "draining": "draining",
}

Notify = Callable[["SlotRunner", str, str], None]  # (runner, event kind, message)


# -- pure policy -----------------------------------------------------------------------------------


@dataclass
class CrashPolicy:
    """Restart with exponential backoff; a crash loop (too many restarts in a window) fails."""

    max_restarts: int = CRASH_LOOP_RESTARTS
    window: float = CRASH_LOOP_WINDOW
    first: float = BACKOFF_FIRST
    cap: float = BACKOFF_MAX
    crashes: list[float] = field(default_factory=list)

    def on_crash(self, now: float) -> float | None:
        """Seconds to wait before the restart, or None when the slot must fail (a crash loop)."""
        backoff = Backoff(self.max_restarts, self.window, self.first, self.cap)
        earlier = backoff.recent(self.crashes, now)
        self.crashes = [*earlier, now]
        return backoff.delay(len(earlier))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: adopted process)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by signal {name}"
    return f"exited with status {code}"


def cap_log(path: Path, max_bytes: int = LOG_MAX_BYTES) -> bool:
    """If ``path`` grew past ``max_bytes``, keep its tail in ``<path>.1`` and truncate it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    keep = max_bytes // 2
    with path.open("rb") as f:
        f.seek(max(0, size - keep))
        tail = f.read(keep)
    old = path.with_name(path.name + ".1")
    old.write_bytes(tail)
    with path.open("r+b") as f:
        f.truncate(0)
    return True


def last_output(log_path: Path) -> str:
    """The last line a child wrote to its log: in the capped-off tail (``<log>.1``) when the
    live file holds none since it was capped."""
    return last_line(log_path) or last_line(log_path.with_name(log_path.name + ".1"))


async def _wait_capping(proc: asyncio.subprocess.Process, log_path: Path,
                        timeout: float) -> int:
    """``proc``'s exit status, capping its log every ``LOG_CAP_EVERY`` meanwhile (a hook that
    writes without end must not fill the disk of the state file); TimeoutError after
    ``timeout`` seconds. The deadline is kept here, not by a surrounding ``asyncio.timeout``
    (on 3.11 its cancel can be taken for an inner wait's own timeout, and lost)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        try:
            return await bounded(proc.wait(), min(LOG_CAP_EVERY, left))
        except TimeoutError:
            cap_log(log_path)
    raise TimeoutError


# -- the runner ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotSpec:
    """Everything needed to run one release in one slot."""

    service: str
    slot: str
    node: str
    release_dir: Path
    manifest: Manifest
    digest: str
    port: int | None
    log_dir: Path
    generation: int = 0
    host: str = "127.0.0.1"
    run_as: RunAs | None = None  # None: as the agent's own user

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.service}-{self.slot}.log"

    def variables(self) -> dict[str, str]:
        """What the agent tells the slot: in its environment, and as ``${NAME}`` in its argv."""
        values = {"PORT": str(self.port)} if self.port is not None else {}
        values.update(FLEETWAVE_NODE=self.node, FLEETWAVE_SLOT=self.slot,
                      FLEETWAVE_VERSION=self.manifest.version)
        return values

    def env(self) -> dict[str, str]:
        """The slot's environment: the manifest's ``env``, the variables, and where it starts
        (``FLEETWAVE_RELEASE_DIR``, should it chdir away: ``processes.not_the_slot``). That one
        is in the environment only, never an argv variable: a command line is readable by every
        user of the host (``ps``), and the release's path, a digest no one can guess, is what
        keeps its files from the host's other users."""
        return child_env(self.run_as, {**self.manifest.env, **self.variables(),
                                       RELEASE_VAR: str(self.release_dir)})

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` with ``${PORT}`` and the other variables filled (protocol.expand)."""
        return expand_argv(argv, self.variables())


class SlotRunner:
    """Supervises one slot's process; see the module docstring for the life cycle."""

    def __init__(self, spec: SlotSpec, notify: Notify, *, now: Callable[[], float] = time.time,
                 policy: CrashPolicy | None = None,
                 halted: Callable[[], bool] = lambda: False) -> None:
        self.spec = spec
        self.notify = notify
        self.now = now
        # The agent stops: nothing is started any more, not even a crashed slot again (a stop
        # that signals the agent and its services at once must not see it start them anew).
        self.halted = halted
        self.policy = policy or CrashPolicy()
        self.status: SlotStatusName = "starting"
        self.since = now()
        self.reason = ""
        self.restarts = 0
        self.last_exit: int | None = None
        self.pid: int | None = None
        self.create_time: float | None = None
        self._proc: child.Child | None = None
        self._adopted = False
        self._validated = spec.manifest.hooks.validate is None
        self._probe_healthy = False
        self._stopping = False
        self._exited = asyncio.Event()
        self._psutil: psutil.Process | None = None
        self._hook_proc: asyncio.subprocess.Process | None = None  # a hook running now

    @classmethod
    def adopt(cls, spec: SlotSpec, pid: int, create_time: float, notify: Notify, *,
              status: str, since: float, restarts: int = 0,
              now: Callable[[], float] = time.time,
              halted: Callable[[], bool] = lambda: False) -> SlotRunner | None:
        """A runner for a live process from the state file, or None (said in one log line) if
        that process is gone or is not this slot's; a process refused is never signalled."""
        where = f"slot {spec.service}/{spec.slot} (pid {pid})"
        if not process_matches(pid, create_time):
            log.info("%s is gone; it will be started again", where)
            return None
        uid = spec.run_as.uid if spec.run_as is not None else os.geteuid()
        why = not_the_slot(pid, spec.release_dir, spec.node, spec.slot, uid)
        if why is not None:
            log.warning("%s is not adopted: %s; the slot will be started again", where, why)
            return None
        if (owner := runs_as(pid)) is not None and owner != uid:
            # Its user changed since it started (--service-user SERVICE=USER given since): it
            # serves on as it was; the service's next deploy starts it as its user.
            log.warning("%s runs as uid %d, not %d as its user now is: it is adopted and serves "
                        "on; the service's next deploy starts its slots as their user", where,
                        owner, uid)
        r = cls(spec, notify, now=now, halted=halted)
        r.pid, r.create_time, r._adopted = pid, create_time, True
        r.status = _LIVE.get(status, "starting")
        # Past "starting" it passed validation before the agent restarted; a starting one may
        # not have (validating again is harmless).
        r._validated = spec.manifest.hooks.validate is None or r.status != "starting"
        r._probe_healthy = r.status in ("healthy", "draining")
        r.since, r.restarts = since, restarts
        return r

    # -- figures ----------------------------------------------------------------------------------

    def figures(self) -> tuple[int, float]:
        """(RSS bytes, CPU percent since the last call) of the slot's process, 0 when none."""
        if self.pid is None:
            return 0, 0.0
        try:
            if self._psutil is None or self._psutil.pid != self.pid:
                self._psutil = psutil.Process(self.pid)
            with self._psutil.oneshot():
                return int(self._psutil.memory_info().rss), float(self._psutil.cpu_percent(None))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0, 0.0

    def rss(self) -> int:
        """RSS bytes of the slot's process, 0 when none (leaves ``figures``' CPU delta alone)."""
        if self.pid is None:
            return 0
        try:
            if self._psutil is None or self._psutil.pid != self.pid:
                self._psutil = psutil.Process(self.pid)
            return int(self._psutil.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0

    @property
    def alive(self) -> bool:
        return self.pid is not None and not self._exited.is_set()

    # -- life cycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Start (unless adopted), watch, probe and restart until stopped or failed."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must fail this slot, not the agent
            log.exception("slot %s/%s supervisor failed", self.spec.service, self.spec.slot)
            self._set_failed(f"agent error supervising the slot: {exc!r}")
            await self._kill_now()

    async def _run(self) -> None:
        if not self._adopted:
            if self.halted():
                return  # the agent stopped before this slot's supervisor ran: nothing starts
            if not await self._hook("pre_start"):
                return
            if self._stopping:
                return  # stopped or failed while the hook ran: the service must not start
            if not await self._spawn():
                return
        while True:
            code = await self._watch()
            if self._stopping or self.status == "failed":
                return
            if self.pid is not None:  # the crashed leader's children must not outlive it
                await end_group(self.pid, 0.0)
            self.last_exit = code
            delay = self.policy.on_crash(self.now())
            if delay is None:
                self._set_failed(
                    f"crash loop: {describe_exit(code)} after {self.restarts} restarts "
                    f"within {self.policy.window:g}s; "
                    f"last output: {last_output(self.spec.log_path)}"
                )
                return
            self._set("starting", f"{describe_exit(code)}; restarting in {delay:g}s")
            self.notify(self, "slot.crashed", self.reason)
            await asyncio.sleep(delay)
            if self._stopping or self.halted():
                return  # (halted: the agent stops; the next one starts it, not counted here)
            self.restarts += 1
            self._adopted = False
            if not await self._spawn():
                return

    async def _spawn(self) -> bool:
        spec = self.spec
        if self._stopping or self.status == "failed" or self.halted():
            # stop() or fail() landed at the last await before this (a restart's backoff, the
            # pre_start hook), or the agent stops: nothing is started. (The start itself does
            # not await: nothing lands while the process is being created.)
            return False
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        self._exited = asyncio.Event()
        self._probe_healthy = False
        try:
            argv = spec.argv(spec.manifest.command)
        except ProtocolError as exc:  # the manifest was checked when read: not on this agent
            self._set_failed(f"command: {exc}")
            return False
        try:
            with spec.log_path.open("ab") as out:
                # Not asyncio's subprocess: its transport kills a child still running when it is
                # collected, which Python 3.13 does as the agent exits (``agent.host.child``).
                self._proc = child.start(
                    argv, cwd=spec.release_dir, env=spec.env(),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True, close_fds=True, **spawn_kwargs(spec.run_as),
                )
        except OSError as exc:
            self._set_failed(f"cannot start {argv[0]}: {exc.strerror or exc}")
            return False
        self.pid = self._proc.pid
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            self.create_time = None  # already gone: _watch sees the exit
        self.notify(self, "slot.started", f"pid {self.pid} on port {spec.port}")
        return True

    async def _watch(self) -> int | None:
        """Probe while the process runs; return its exit status (None when adopted)."""
        health = self.spec.manifest.health
        if health.exec is not None:
            # Checked when the manifest was read; should it still fail, run() fails the slot.
            health = msgspec.structs.replace(health, exec=self.spec.argv(health.exec))
        # An adopted slot that was healthy is probed as one: after the agent's restart a
        # process that stopped answering turns unhealthy (and is healed), and a refused port
        # is not a starting slot's to watch for its first listen.
        prober = Prober(health, self.spec.port, self.spec.release_dir,
                        self.spec.env(), self._on_health, run_as=self.spec.run_as,
                        healthy=self._probe_healthy)
        async with asyncio.TaskGroup() as tg:
            probing = tg.create_task(prober.run(), name=f"probe-{self.spec.slot}")
            try:
                code = await self._wait_exit()
            finally:
                prober.stop()  # ends the loop even if the cancel below is swallowed (see stop)
                probing.cancel()
        self._exited.set()
        return code

    async def _wait_exit(self) -> int | None:
        loop = asyncio.get_running_loop()
        next_cap = loop.time()
        while True:
            if loop.time() >= next_cap:
                cap_log(self.spec.log_path)
                next_cap = next_tick(loop.time(), LOG_CAP_EVERY)
            if self._proc is not None:
                # The exit wakes this wait by itself; the timeout only brings the next log cap
                # check (on the shared grid: agent.cadence), not a poll once a second.
                try:
                    return await bounded(
                        self._proc.wait(), max(0.0, next_cap - loop.time())
                    )
                except TimeoutError:
                    continue
            if self.pid is None or self.create_time is None:
                return None
            if not process_matches(self.pid, self.create_time):
                return None
            await asyncio.sleep(ADOPTED_POLL)

    async def _on_health(self, healthy: bool, reason: str) -> None:
        self._probe_healthy = healthy
        if self.status in ("draining", "stopping", "stopped", "failed"):
            return
        if healthy and not self._validated:
            if not await self._hook("validate"):
                # It never had traffic. Kill without waiting: this runs inside the probe task,
                # which the watcher cancels as soon as the process is gone (and reaps it).
                if self.pid is not None and self._is_ours():
                    killpg(self.pid, signal.SIGKILL)
                return
            self._validated = True
        if healthy and self.status != "healthy":
            self._set("healthy", "")
            self.notify(self, "slot.healthy", f"pid {self.pid}")
        elif not healthy and self.status == "healthy":
            self._set("unhealthy", reason)
            self.notify(self, "slot.unhealthy", reason)

    async def _hook(self, name: str) -> bool:
        """Run a hook if the manifest has one; on failure the slot fails with its status."""
        raw = getattr(self.spec.manifest.hooks, name)
        if raw is None:
            return True
        try:
            argv = self.spec.argv(raw)
        except ProtocolError as exc:
            self._set_failed(f"hooks.{name}: {exc}")
            return False
        timeout = self.spec.manifest.hooks.timeout
        self.spec.log_dir.mkdir(parents=True, exist_ok=True)
        hook_log = self.spec.log_dir / f"{self.spec.service}-{self.spec.slot}.{name}.log"
        try:
            # A new file each run, appended to (O_APPEND): capped while the hook runs, its next
            # write lands at the new end (written from an offset, it would leave a sparse file
            # as large as before).
            hook_log.unlink(missing_ok=True)
            with hook_log.open("ab") as out:
                proc = await spawn_owned(
                    argv, cwd=self.spec.release_dir, env=self.spec.env(), stdout=out, stderr=out,
                    **spawn_kwargs(self.spec.run_as),
                )
        except OSError as exc:
            self._set_failed(f"hooks.{name} cannot start {argv[0]}: {exc.strerror or exc}")
            return False
        self._hook_proc = proc
        try:
            code = await _wait_capping(proc, hook_log, timeout)
        except TimeoutError:
            await kill_and_reap(proc)
            self._set_failed(f"hooks.{name} did not finish within {timeout:g}s")
            return False
        except asyncio.CancelledError:
            await kill_and_reap(proc)
            raise
        finally:
            self._hook_proc = None
        await end_leftovers(proc.pid)  # what it started in the background (``cmd &``) ends too
        if self._stopping:
            return False  # stop() or fail() ended the hook: their status says why
        if code != 0:
            self.last_exit = code
            self._set_failed(f"hooks.{name} {describe_exit(code)}: {last_output(hook_log)}")
            return False
        return True

    def drain(self) -> None:
        """Traffic has moved away: keep running until stopped (in-flight requests finish)."""
        if self.status in ("healthy", "unhealthy", "starting"):
            self._set("draining", "")

    def resume(self) -> None:
        """A draining slot is needed again."""
        if self.status == "draining":
            self._set("healthy" if self._probe_healthy else "unhealthy", "")

    async def stop(self, timeout: float) -> None:
        """SIGTERM to the slot's process group, SIGKILL after ``timeout``; always reaped."""
        self._stopping = True
        if self.status != "failed":
            self._set("stopping", "")
        await self._terminate(timeout)
        if self.status != "failed":
            self._set("stopped", "")
        self.notify(self, "slot.stopped", describe_exit(self.last_exit))

    async def fail(self, reason: str) -> None:
        """Give up on this slot (e.g. not healthy in time): kill its process, record why."""
        self._set_failed(reason)
        self._stopping = True
        await self._terminate(1.0)

    async def _terminate(self, timeout: float) -> None:
        await self._end_hook(timeout)
        if self.pid is None or not self._is_ours():
            # Our child exited on its own just before this stop (its runner had not yet ended
            # its group): what is left of its group goes too, or a worker of it would keep the
            # port. (An adopted process that is gone is not ours to judge: its number may name
            # another group by now.)
            if self.pid is not None and self._proc is not None and group_alive(self.pid):
                killpg(self.pid, signal.SIGTERM)
                await end_group(self.pid, asyncio.get_running_loop().time() + timeout)
            self._exited.set()
            return
        pgid, deadline = self.pid, asyncio.get_running_loop().time() + timeout
        killpg(pgid, signal.SIGTERM)
        if not await self._wait_gone(timeout):
            killpg(pgid, signal.SIGKILL)
            await self._wait_gone(KILL_WAIT)
        await end_group(pgid, deadline)
        if self._proc is not None and self._proc.returncode is not None:
            self.last_exit = self._proc.returncode

    async def _end_hook(self, timeout: float) -> None:
        """A hook still running when the slot stops (a hung migration) is ended like the
        service, SIGTERM then SIGKILL after ``timeout``: the stop must not wait for the hook's
        own timeout, and the hook must not outlive the slot."""
        proc = self._hook_proc
        if proc is None or proc.returncode is not None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        killpg(proc.pid, signal.SIGTERM)
        try:
            await bounded(asyncio.shield(proc.wait()), timeout)
        except TimeoutError:
            await kill_and_reap(proc)
        await end_group(proc.pid, deadline)

    def _is_ours(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is None
        return self.create_time is not None and process_matches(self.pid or 0, self.create_time)

    async def _wait_gone(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self._proc is not None:
                try:
                    await bounded(self._proc.wait(), max(0.01, deadline - loop.time()))
                    return True
                except TimeoutError:
                    return False
            if not self._is_ours():
                return True
            await asyncio.sleep(0.05)  # polling an adopted process, bounded by the deadline
        return not self._is_ours()

    async def _kill_now(self) -> None:
        self._stopping = True
        await self._terminate(0.5)

    def _set(self, status: SlotStatusName, reason: str) -> None:
        if status != self.status:
            self.since = self.now()
        self.status = status
        self.reason = reason

    def _set_failed(self, reason: str) -> None:
        if self.status == "failed":
            return
        self._set("failed", reason)
        log.warning("slot %s/%s failed: %s", self.spec.service, self.spec.slot, reason)
        self.notify(self, "slot.failed", reason)
