"""Ansible vs fleetwave: the same in-place rolling update of N hosts, one run, same load.

Side by side with a peer (issue 17): both update hello on N hosts, 20 % at a time, under the
same steady HTTP load, one after the other in one run.

Usage: python tests/perf/bench_vs_ansible.py [--nodes 10] [--rate 20] [--repeat 1] [--json]

Needs ``ansible-core`` (``pip install -e '.[bench]'``); without ``ansible-playbook`` beside this
Python or on PATH it says so in one line and exits 2. Nothing else is installed at run time.

The service is the example hello (``deploy/examples/hello``: ``app.py`` and its manifest's
``command``, ``env`` and ``port``), 1.0.0 rolled to 2.0.0 on N "hosts", 20 % of them at a time.

**Ansible** (the incumbent's way; made fair and best-case for it): an inventory of N hosts, all
``ansible_connection: local``, host i running one instance of hello on ``<SUBNET>.(100+i):8080``
from its own directory under the run dir, where both releases are already copied (no copy
step; fleetwave's agents fetch a release when it is pushed, before the timed deploy). The
playbook runs with ``serial: 20%``, ``forks`` = N, ``gather_facts: false``, pipelining on, the
linear strategy (``free`` measured no faster: 42.6 and 27.4 s against 40.5 and 13.0 s at N=10,
alternated),
and per host: stop the old process (SIGTERM; hello finishes its requests in flight and exits;
the task returns once the process is gone), start the new version (detached, as a service
manager would), and wait for its health check (``uri`` on ``/healthz`` until 200, every 0.1 s:
no other sleep). The load goes straight to the N ports: there is no router, so each host is
down from its stop to its start; that moment of downtime per host is the point. Timed: the
``ansible-playbook`` command, start to exit. The timeline of its task headers (read as they are
printed) gives the seconds spent in each task.

**fleetwave**: a dev fleet (``coordinator.dev.devfleet.DevFleet``: broker, coordinator, N real
agents on ``<SUBNET>.1..N``), hello 1.0.0 installed everywhere, then 2.0.0 and 2.0.1 pushed: each
agent fetches a pushed release of a service it runs at once (``agent.manager.prefetch``), as
Ansible's hosts have both releases copied already, and the run waits until all have. Then
``fleetwave deploy hello 2.0.0 --strategy rolling --batch 20% --max-unavailable 20% --bake 0
--prestage 0`` (the CLI, followed to its end); then on the same fleet, 1.0.0 reinstalled before
each, the same deploy with ``--prestage 1`` and with ``--prestage all`` (``prestaged``: their
figures and ratios). Each agent starts the new slot beside the old one, waits for its health
checks (two passes, 200 ms apart), switches its router and drains the old slot. The load
goes through the N routers. Timed: the CLI command, start to exit. From the fleet's events the
run also reports, per wave, where the seconds go: from ``wave.started`` to the last new slot
started (its spawn; a fetch too, of a release not at hand), to the last one healthy (health
checks), to the last node done (the switch and its report), and the coordinator's hand-over to
the next wave. Pre-staging (issue 17 part 1) starts and health-checks the slots of upcoming
waves ahead of their turn: the "pre-stageable" figure of the run without it is the sum over the
waves after the first of their start and health time, i.e. what could leave the critical
path; the prestaged runs show
what did. Last, ``--prestage all`` once more with the health check Ansible's playbook runs
(``same_check``: release 2.0.1, 2.0.0 healthy at the first answer, polled every 0.1 s, where
the example's manifest asks for two passes 200 ms apart on the agent's 200 ms grid): the two
tools checking the new process the same way.

``--repeat N`` runs the head-to-head pair, Ansible's update and fleetwave's ``--prestage all``
with Ansible's health check, N times each (OLD installed again before each run, untimed), and
reports each side's median run and every run's seconds: one run of each is ±10 % on this shared
2-core machine, enough to move their ratio across a target.

Printed: both wall times and their ratio; the ratio of their work alone too (Ansible from its
first play to its recap, fleetwave from ``rollout.started`` to ``rollout.succeeded``: neither
CLI's start-up, nor fleetwave's CLI noticing the end and exiting); both failed
request counts; Ansible's seconds per task and fleetwave's per-wave timeline.

The example's command is ``python3 app.py``; for both tools ``python3`` is this Python's own
interpreter (its directory first on PATH, ``real_python3``), not a version manager's shim that a
host would not have (pyenv's costs ~0.1 s of CPU a start): printed as "python3".

The load is the same for both (``coordinator.dev.traffic.Traffic``): per host two workers at
``--rate`` requests/s each, one on keep-alive connections, one opening a connection a request;
a failed request is a connection error, a timeout or a 5xx. Failed requests are counted from
the deploy's start to one second after it ends (the measurement window; the old processes'
last requests are inside it).

Every process it starts lives under its run dir and is stopped on the way out, SIGTERM included
(``perf_support.run_main``, ``run_dir``); a killed run's leftovers are reaped by the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import shlex
import shutil
import statistics
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import SUBNET, EventTap, emit, poll, run_dir, run_main, stop_process

from agent.reconcile import RUNNING
from coordinator.dev.broker import free_port
from coordinator.dev.devfleet import DevFleet
from coordinator.dev.examples import assembled
from coordinator.dev.traffic import Traffic, TrafficReport, probe_version
from coordinator.releases import push_release
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.messages import (
    TERMINAL_STATES,
    ApiReply,
    DeployRequest,
    ObservedState,
    RolloutRequest,
    RolloutSpec,
)

T = TypeVar("T")
OLD, NEW = "1.0.0", "2.0.0"
# NEW with Ansible's health check instead of the example's own (``same_check``): one answer
# below 400 polled every 0.1 s, where the example asks for two passes 200 ms apart.
SAME = "2.0.1"
BATCH = "20%"
PRESTAGED = ("1", "all")  # the --prestage values measured after the run without it
WORKERS = 2  # per host: one keep-alive, one connection a request (Traffic's split)
TAIL = 1.0  # seconds of load counted after a deploy ends
ANSIBLE_HOST0 = 100  # Ansible's host i binds <SUBNET>.(100+i): apart from the agents' .1..N
MAX_NODES = 100
MAX_REPEAT = 9
DEPLOY_TIMEOUT = 600.0
INSTALL_HINT = ("ansible-playbook not found: this benchmark needs ansible-core; install it with "
                "`pip install -e '.[bench]'` (or `pip install ansible-core`) and run it again")

PLAYBOOK = """\
- name: in-place rolling update of hello
  hosts: fleet
  gather_facts: false
  serial: "{{ batch }}"
  tasks:
    - name: stop the old process
      # SIGTERM: hello stops accepting, finishes its requests in flight and exits; the task
      # returns once it is gone (a zombie is gone: nothing here reaps orphans but PID 1).
      ansible.builtin.shell: |
        [ -f run/hello.pid ] || exit 0
        pid=$(cat run/hello.pid)
        kill -TERM "$pid" 2>/dev/null || exit 0
        while [ -e "/proc/$pid" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"; do
          sleep 0.02
        done
      args:
        chdir: "{{ home }}"
    - name: start the new version
      ansible.builtin.shell: >-
        setsid {{ command }} >{{ home }}/run/hello.log 2>&1 </dev/null &
        echo $! >{{ home }}/run/hello.pid
      args:
        chdir: "{{ home }}/releases/{{ version }}"
      environment: "{{ service_env[version] | combine({'PORT': port | string,
        'BIND_HOST': bind, 'FLEETWAVE_VERSION': version,
        'FLEETWAVE_NODE': inventory_hostname}) }}"
    - name: wait for its health check
      ansible.builtin.uri:
        url: "http://{{ bind }}:{{ port }}/healthz"
        timeout: 2
      register: health
      until: health.status == 200
      retries: 100
      delay: 0.1
"""


def ansible_playbook() -> str | None:
    """The ``ansible-playbook`` of this Python's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    return str(beside) if beside.exists() else shutil.which("ansible-playbook")


def real_python3() -> str:
    """Make ``python3`` (the example's command) name this Python's own interpreter for every
    process of the run, both tools' hosts alike, by putting its directory first on PATH; the
    interpreter it names.

    On a developer's machine ``python3`` on PATH is often a version manager's shim: pyenv's is
    a bash script that runs ``pyenv exec``, ~0.1 s of CPU before Python starts (measured here:
    126 ms a start against 26 ms for the interpreter itself), which a host's ``python3`` does
    not cost. Ten or twenty such starts at once were most of what both tools' runs waited for.
    Whatever else that directory holds (this environment's ``ansible-playbook``, ``fleetwave``)
    is what the run would use anyway."""
    here = Path(sys.executable).parent
    if (here / "python3").exists():
        os.environ["PATH"] = os.pathsep.join([str(here), os.environ.get("PATH", "")])
    return shutil.which("python3") or "python3 (not found on PATH)"


def manifest(version: str) -> dict[str, Any]:
    return tomllib.loads((assembled(version) / "fleetwave.toml").read_text())


def same_check(tmp: Path) -> Path:
    """The bundle of NEW as version SAME whose health check is the one Ansible's playbook runs
    (``uri`` until 200, every 0.1 s: healthy at the first pass), so that both tools check the
    new process the same way; the example's own check (two passes 200 ms apart, on the
    agent's 200 ms grid) costs 0.2-0.4 s more a start, which Ansible's run does not pay."""
    out = tmp / "same-check" / SAME
    shutil.copytree(assembled(NEW), out)
    path = out / "fleetwave.toml"
    text = path.read_text()
    for old, new in ((f'version = "{NEW}"', f'version = "{SAME}"'),
                     ('start_interval = "200ms"', 'start_interval = "100ms"'),
                     ("healthy_threshold = 2", "healthy_threshold = 1")):
        if old not in text:
            raise RuntimeError(f"the example's manifest of {NEW} no longer says {old!r}: "
                               "update same_check")
        text = text.replace(old, new)
    path.write_text(text)
    return out


# -- the load --------------------------------------------------------------------------------------


@dataclass
class Window:
    """The load's figures over one deploy's window: requests, failures, and why."""

    requests: int = 0
    failed: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @classmethod
    def between(cls, a: TrafficReport, b: TrafficReport) -> Window:
        return cls(b.requests - a.requests, b.failed - a.failed,
                   {v: n - a.versions[v] for v, n in b.versions.items() if n > a.versions[v]},
                   b.failures[len(a.failures):][:5])


async def warmed(traffic: Traffic, version: str, n: int) -> None:
    """Wait until the load has had a few answers from ``version`` a host."""
    await poll(lambda: asyncio.sleep(0, traffic.report.versions[version]),
               lambda got: got >= 4 * n, timeout=30, what=f"the load to reach {version}")


async def timed(argv: list[str], env: dict[str, str], cwd: Path,
                marks: list[tuple[float, str]] | None = None) -> tuple[float, str]:
    """Run ``argv`` in ``cwd`` to its end; (seconds, its standard output). With ``marks``,
    every output line is kept with the monotonic time it arrived. Its standard error goes to
    ``cwd/stderr.log``; RuntimeError with both tails on a non-zero exit."""
    started = time.monotonic()
    errors = cwd / "stderr.log"
    with errors.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=err)
    lines: list[str] = []
    try:
        async with asyncio.timeout(DEPLOY_TIMEOUT):
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                lines.append(line)
                if marks is not None:
                    marks.append((time.monotonic(), line))
            code = await proc.wait()
    finally:
        if proc.returncode is None:  # stopped (SIGTERM) or timed out: ask, then insist
            await stop_process(proc)
    elapsed = time.monotonic() - started
    out = "\n".join(lines)
    if code != 0:
        raise RuntimeError(f"{Path(argv[0]).name} {' '.join(argv[1:4])}... exited {code}:\n"
                           f"{out[-3000:]}\n{errors.read_text(errors='replace')[-2000:]}")
    return elapsed, out


async def under_load(targets: list[tuple[str, int]], rate: float,
                     deploy: Callable[[], Awaitable[T]]) -> tuple[T, Window]:
    """Start the load on ``targets`` (serving OLD), run ``await deploy()`` and ``TAIL`` more
    seconds, and return its result with the load's window."""
    traffic = Traffic(targets, workers_per_target=WORKERS, rate=rate)
    traffic.start()
    try:
        await warmed(traffic, OLD, len(targets))
        before = traffic.snapshot()
        result = await deploy()
        await asyncio.sleep(TAIL)  # the measurement window's tail, not a wait for anything
        return result, Window.between(before, traffic.snapshot())
    finally:
        await traffic.stop()


# -- where the CPU goes ----------------------------------------------------------------------------

# A process's role, by its command line (the first that matches): what each side spends its CPU on.
ROLES = (("nats-server", "broker"), ("coordinator.daemon", "coordinator"),
         ("agent.router", "routers"), ("agent.main", "agents"), ("app.py", "services"),
         ("ansible", "ansible"))


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


class CpuMeter:
    """CPU-seconds spent between ``start`` and ``stop``, by role, of every process whose command
    line or working directory lies under ``root`` (the run dir: the fleet's broker,
    coordinator, agents, routers and services, Ansible's hosts), of this process (the load and
    the event tap) and of the children it reaped meanwhile (the timed command: fleetwave's CLI,
    ansible-playbook with the workers it reaped). A process that exits before ``stop`` and is
    not ours to reap is counted to its last look (``vanished``). On 2 cores the sum over the
    wall time says how busy the machine was: at 2.0 every process waited for a core."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._before: dict[int, tuple[str, float]] = {}
        self._own = self._reaped = 0.0

    def _look(self) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        me = os.getpid()
        for p in psutil.process_iter(["cmdline", "cwd"]):
            if p.pid == me:
                continue
            cmd = " ".join(p.info["cmdline"] or ())
            if self.root not in cmd and not (p.info["cwd"] or "").startswith(self.root):
                continue
            role = next((r for key, r in ROLES if key in cmd), "other")
            try:
                out[p.pid] = (role, _cpu(p))
            except psutil.Error:
                continue
        return out

    @staticmethod
    def _children() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    def start(self) -> None:
        self._before = self._look()
        self._own, self._reaped = _cpu(psutil.Process()), self._children()

    def stop(self, command: str) -> dict[str, float]:
        after = self._look()
        spent: dict[str, float] = {}
        for pid, (role, cpu) in after.items():
            spent[role] = spent.get(role, 0.0) + cpu - self._before.get(pid, (role, 0.0))[1]
        spent[command] = self._children() - self._reaped
        spent["bench (load, events)"] = _cpu(psutil.Process()) - self._own
        spent = {k: round(v, 3) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
        spent["vanished"] = float(len(set(self._before) - set(after)))
        return spent


def cpu_line(cpu: dict[str, float], seconds: float) -> str:
    busy = sum(v for k, v in cpu.items() if k != "vanished")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != "vanished" and v >= 0.005)
    return (f"{busy:.2f} CPU-s in {seconds:.2f} s ({busy / seconds:.2f} cores of 2): {parts}"
            if seconds > 0 else parts)


# -- Ansible ---------------------------------------------------------------------------------------


def ansible_host(i: int) -> str:
    return f"{SUBNET}.{ANSIBLE_HOST0 + i}"


def lay_out_ansible(root: Path, n: int) -> tuple[dict[str, str], list[tuple[str, int]]]:
    """Hosts' directories with both releases, inventory, playbook and config under ``root``;
    the environment to run ``ansible-playbook`` with, and the hosts' (address, port)."""
    port = int(manifest(OLD)["port"])
    hosts: dict[str, Any] = {}
    for i in range(1, n + 1):
        name = f"host-{i:02d}"
        home = root / "hosts" / name
        for v in (OLD, NEW):
            shutil.copytree(assembled(v), home / "releases" / v)
        (home / "run").mkdir(parents=True)
        hosts[name] = {"bind": ansible_host(i), "port": port, "home": str(home)}
    command = shlex.join(manifest(NEW)["command"])
    if command != shlex.join(manifest(OLD)["command"]):
        raise RuntimeError("the example's command differs between releases; the playbook "
                           "starts one command")
    inventory = {"fleet": {"hosts": hosts, "vars": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "command": command,
        "service_env": {v: {k: str(x) for k, x in manifest(v).get("env", {}).items()}
                        for v in (OLD, NEW)}}}}
    (root / "inventory.json").write_text(json.dumps(inventory))
    (root / "playbook.yml").write_text(PLAYBOOK)
    (root / "ansible.cfg").write_text(
        "[defaults]\n"
        f"inventory = {root / 'inventory.json'}\n"
        f"forks = {max(n, 5)}\n"
        "gathering = explicit\n"
        "retry_files_enabled = False\n"
        "host_key_checking = False\n"
        "nocolor = True\n"
        "[connection]\n"
        "pipelining = True\n")
    env = {**os.environ, "ANSIBLE_CONFIG": str(root / "ansible.cfg"),
           "ANSIBLE_HOME": str(root / "ansible-home"),
           "ANSIBLE_LOCAL_TEMP": str(root / "ansible-tmp"), "PYTHONUNBUFFERED": "1"}
    return env, [(h["bind"], port) for h in hosts.values()]


def playbook_argv(binary: str, root: Path, version: str, batch: str) -> list[str]:
    return [binary, str(root / "playbook.yml"), "-e",
            json.dumps({"version": version, "batch": batch})]


def task_seconds(marks: list[tuple[float, str]], started: float, ended: float) -> dict[str, float]:
    """Seconds per task name, from the times the task headers were printed (a task lasts until
    the next header or the end); the play headers between batches count as their own."""
    def label(line: str) -> str:
        if line.startswith("TASK ["):
            return line.split("[", 1)[1].rsplit("]", 1)[0]
        return "recap" if line.startswith("PLAY RECAP") else "batch start"

    heads = [(t, label(line)) for t, line in marks
             if line.startswith(("TASK [", "PLAY [", "PLAY RECAP"))]
    out: dict[str, float] = {}
    prev_t, prev_name = started, "start-up"
    for t, name in [*heads, (ended, "")]:
        out[prev_name] = out.get(prev_name, 0.0) + (t - prev_t)
        prev_t, prev_name = t, name
    return {k: round(v, 2) for k, v in out.items()}


async def measure_ansible(tmp: Path, n: int, rate: float, binary: str,
                          repeat: int = 1) -> dict[str, Any]:
    """Ansible's update, ``repeat`` times (OLD installed again before each, untimed): the
    figures of the median run, and every run's seconds (``runs_s``)."""
    root = tmp / "ansible"
    env, targets = lay_out_ansible(root, n)
    meter = CpuMeter(tmp)
    results: list[dict[str, Any]] = []
    for _ in range(repeat):
        await timed(playbook_argv(binary, root, OLD, "100%"), env, root)  # the install: untimed
        answers = await asyncio.gather(*(probe_version(h, p) for h, p in targets))
        if set(answers) != {OLD}:
            raise RuntimeError(f"Ansible's hosts should serve {OLD} after the install: {answers}")
        marks: list[tuple[float, str]] = []

        async def deploy(marks: list[tuple[float, str]] = marks
                         ) -> tuple[float, float, dict[str, float]]:
            started = time.monotonic()
            meter.start()
            seconds, _ = await timed(playbook_argv(binary, root, NEW, BATCH), env, root, marks)
            return started, seconds, meter.stop("ansible-playbook (reaped)")

        (started, seconds, cpu), window = await under_load(targets, rate, deploy)
        answers = await asyncio.gather(*(probe_version(h, p) for h, p in targets))
        if set(answers) != {NEW}:
            raise RuntimeError(f"Ansible's hosts should serve {NEW} after the update: {answers}")
        batches = sum(1 for _, line in marks if line.startswith("PLAY ["))
        results.append({"seconds": round(seconds, 2), "batches": batches,
                     "tasks_s": task_seconds(marks, started, started + seconds), "cpu_s": cpu,
                     **window_figures(window)})
    return median_run(results)


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median ``seconds`` (the lower of the two middle ones for an even count:
    a run that happened), with every run's seconds in order (``runs_s``)."""
    middle = statistics.median_low(r["seconds"] for r in results)
    chosen = next(r for r in results if r["seconds"] == middle)
    return {**chosen, "runs_s": [r["seconds"] for r in results]}


def window_figures(w: Window) -> dict[str, Any]:
    return {"requests": w.requests, "failed": w.failed, "versions": w.versions,
            "failures": w.reasons}


# -- fleetwave -------------------------------------------------------------------------------------


async def install(bus: Bus, fleet: DevFleet, n: int) -> None:
    """OLD on every node in one wave, then every router answering with it."""
    spec = RolloutSpec(service="hello", version=OLD, batch="100%", max_unavailable="100%",
                       bake=0.0, progress_deadline=60.0)
    reply = decode(ApiReply, await bus.request(subjects.api(bus.fleet, fleet.caller, "deploy"),
                                               encode(DeployRequest(spec=spec)), timeout=30))
    if not reply.ok:
        raise RuntimeError(f"deploy {OLD} refused: {reply.error}")
    rid = reply.data["id"]

    async def status() -> dict[str, Any]:
        raw = await bus.request(subjects.api(bus.fleet, fleet.caller, "status"),
                                encode(RolloutRequest(id=rid)), timeout=10)
        return dict(decode(ApiReply, raw).data)

    final = await poll(status, lambda s: s["state"] in TERMINAL_STATES, timeout=120,
                       what=f"the install of {OLD}", interval=0.2)
    if final["state"] != "succeeded":
        failed = {node: p.get("reason", "") for node, p in final.get("nodes", {}).items()
                  if p.get("reason")}
        raise RuntimeError(f"the install of {OLD} ended {final['state']}: "
                           f"{final.get('reason', '')}; nodes: {failed}")
    port = int(manifest(OLD)["port"])
    await poll(lambda: asyncio.gather(*(probe_version(fleet.host(i), port)
                                        for i in range(1, n + 1))),
               lambda answers: set(answers) == {OLD}, timeout=30,
               what=f"every router serving {OLD}")
    # And every slot of a run before (NEW, SAME) stopped, not draining: an agent takes a
    # draining slot back when the same release is wanted again (no start at all), which would
    # time the next deploy of it on warm slots (the drain is 2 s; an install can end well within
    # that: --repeat's runs of SAME did, at 0.46 s against 0.83 s).
    obs = subjects.observed_bucket(bus.fleet)

    async def others_running() -> int:
        entries = [await bus.kv_get(obs, subjects.node_service_key(f"node-{i}", "hello"))
                   for i in range(1, n + 1)]
        states = [decode(ObservedState, e.value) for e in entries if e and e.value]
        return sum(1 for o in states for st in o.slots.values()
                   if st.version != OLD and st.status in RUNNING) + (n - len(states))

    await poll(others_running, lambda left: left == 0, timeout=60,
               what=f"every node's slots of a run before (not {OLD}) stopped", interval=0.2)


def wave_timeline(tap: EventTap, rid: str, version: str = NEW) -> list[dict[str, Any]]:
    """Per wave, seconds from its ``wave.started`` to the last of its new slots started, healthy,
    and its nodes done; then to the next wave's start (or the rollout's end)."""
    mine = [s.event for s in tap.events if s.event.rollout == rid]
    starts = sorted((e.data.get("wave", 0), e.time) for e in mine if e.kind == "wave.started")
    ends = [e.time for e in mine if e.kind == "rollout.succeeded"]
    updating = {e.node: e.time for e in mine if e.kind == "node.updating"}
    done = {e.node: e.time for e in mine if e.kind == "node.done"}
    slots = [s.event for s in tap.events if s.event.service == "hello"
             and s.event.data.get("version") == version]
    out = []
    for k, (wave, t0) in enumerate(starts):
        t1 = starts[k + 1][1] if k + 1 < len(starts) else (ends[0] if ends else t0)
        nodes = {n for n, t in updating.items() if t0 <= t < t1}

        def last(kind: str, nodes: set[str] = nodes, t0: float = t0, t1: float = t1) -> float:
            times = [e.time for e in slots if e.kind == kind and e.node in nodes
                     and t0 <= e.time <= t1]
            return round(max(times) - t0, 3) if times else float("nan")

        finished = [done[n] for n in nodes if n in done]
        out.append({"wave": wave, "nodes": len(nodes), "started_s": last("slot.started"),
                    "healthy_s": last("slot.healthy"),
                    "done_s": round(max(finished) - t0, 3) if finished else float("nan"),
                    "next_s": round(t1 - t0, 3)})
    return out


async def fetched_ahead(fleet: DevFleet, n: int, digest: str) -> None:
    """Wait until every agent has the release of ``digest`` unpacked in its cache (fetched when
    it was pushed: ``agent.manager.prefetch``)."""
    dirs = [fleet.dir / f"node-{i}" / "releases" / digest.removeprefix("sha256:")
            for i in range(1, n + 1)]

    async def missing() -> int:
        return sum(not d.is_dir() for d in dirs)

    await poll(missing, lambda left: left == 0, timeout=60,
               what=f"every agent to fetch {digest[:19]}... once pushed", interval=0.05)


async def measure_fleetwave(tmp: Path, n: int, rate: float, repeat: int = 1) -> dict[str, Any]:
    """The rolling update without pre-staging (``fleetwave``), then on the same fleet, back on
    OLD each time, with each of ``PRESTAGED`` (``prestaged``), and with ``--prestage all`` of
    the release whose health check is Ansible's (``same_check``: ``repeat`` times, the median
    run's figures and every run's seconds)."""
    async with DevFleet(tmp / "fleet", agents=n, subnet=SUBNET, fleet="perfvs",
                        heartbeat_interval=2.0) as fleet:
        bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="perf-vs-ansible",
                                **fleet.access())
        try:
            tap = EventTap()
            await tap.start(bus)
            await push_release(bus, assembled(OLD))
            await install(bus, fleet, n)
            # Pushed once OLD runs, as a team pushes a release to deploy it: every agent fetches
            # it then (prefetch), as Ansible's hosts have both releases copied already.
            for bundle in (assembled(NEW), same_check(tmp)):
                pushed = await push_release(bus, bundle)
                await fetched_ahead(fleet, n, pushed.info.digest)
            plain = await rolled(tmp, bus, fleet, tap, n, rate, "0")
            prestaged = {ahead: await rolled(tmp, bus, fleet, tap, n, rate, ahead)
                         for ahead in PRESTAGED}
            same = median_run([await rolled(tmp, bus, fleet, tap, n, rate, "all", SAME)
                               for _ in range(repeat)])
            # The start floor again, under the same load on this fleet (serving OLD): what a
            # staged first wave waits for here, with the traffic competing for the 2 cores.
            await install(bus, fleet, n)
            port = int(manifest(OLD)["port"])
            loaded, _ = await under_load([(fleet.host(i), port) for i in range(1, n + 1)], rate,
                                         lambda: start_floor(tmp, n))
        finally:
            await bus.close()
    return {**plain, "prestaged": prestaged, "same_check": same,
            "start_floor_loaded_s": round(loaded, 2)}


async def rolled(tmp: Path, bus: Bus, fleet: DevFleet, tap: EventTap, n: int, rate: float,
                 prestage: str, version: str = NEW) -> dict[str, Any]:
    """OLD installed everywhere, then the timed rolling deploy of ``version`` with
    ``--prestage``."""
    await install(bus, fleet, n)
    port = int(manifest(OLD)["port"])
    targets = [(fleet.host(i), port) for i in range(1, n + 1)]
    env = {**os.environ, **fleet.client_env()}
    argv = [sys.executable, "-c",
            "from coordinator.console import run; run()",
            *fleet.client_args(), "deploy", "hello", version, "--strategy", "rolling",
            "--batch", BATCH, "--max-unavailable", BATCH, "--bake", "0",
            "--prestage", prestage, "-o", "json"]

    meter = CpuMeter(tmp)

    async def deploy() -> tuple[float, float, str, dict[str, float]]:
        sent = time.time()
        meter.start()
        seconds, out = await timed(argv, env, tmp)
        return sent, seconds, out, meter.stop("cli (reaped)")

    (sent, seconds, out, cpu), window = await under_load(targets, rate, deploy)
    rid = str(json.loads(out)["id"])  # -o json: the last status, as one document
    end = await tap.wait_for(rid, ("rollout.succeeded",), 30)
    begun = tap.of(rid, "rollout.started")
    answers = await asyncio.gather(*(probe_version(h, p) for h, p in targets))
    if set(answers) != {version}:
        raise RuntimeError(f"the routers should serve {version} after the deploy: {answers}")
    waves = wave_timeline(tap, rid, version)
    if begun:
        # Every node started a process of ``version`` in this rollout: a slot taken back from
        # its drain would time a switch, not an update (``install`` waits for them to stop).
        started = {e.node for s in tap.events
                   if (e := s.event).kind == "slot.started" and e.data.get("version") == version
                   and begun[0].time <= e.time <= end.event.time}
        if len(started) < n:
            raise RuntimeError(f"only {len(started)} of {n} nodes started a {version} slot in "
                               f"the timed deploy: the others had one running already")
    # What pre-staging would take off the critical path: a later wave's start and
    # health checks (the first wave's cannot start earlier than the deploy).
    stageable = sum(w["healthy_s"] for w in waves[1:] if w["healthy_s"] == w["healthy_s"])
    engine = end.event.time - begun[0].time if begun else float("nan")
    # The CLI's own share: start-up, connecting and the deploy request before the coordinator's
    # rollout.started; after rollout.succeeded, the follower's status read and its exit.
    before = begun[0].time - sent if begun else float("nan")
    return {"seconds": round(seconds, 2), "engine_s": round(engine, 2),
            "cli_before_start_s": round(before, 2),
            "cli_after_end_s": round(sent + seconds - end.event.time, 2), "waves": waves,
            "cpu_s": cpu,
            "prestageable_s": round(stageable, 2), **window_figures(window)}


# -- the run ---------------------------------------------------------------------------------------


async def start_floor(tmp: Path, n: int) -> float:
    """Seconds from spawning ``n`` processes of NEW at once (the example's command, each on its
    own address, no load, no fleetwave) to the last one answering its health check: the cold
    start a ``--prestage all`` rollout's first wave cannot beat on this machine's cores."""
    m = manifest(NEW)
    home = assembled(NEW)
    env0 = {**os.environ, **{k: str(v) for k, v in m.get("env", {}).items()},
            "FLEETWAVE_VERSION": NEW}
    addrs = [(ansible_host(i), free_port(ansible_host(i))) for i in range(1, n + 1)]
    procs: list[asyncio.subprocess.Process] = []
    started = time.perf_counter()
    try:
        for i, (host, port) in enumerate(addrs, 1):
            procs.append(await asyncio.create_subprocess_exec(
                *m["command"], cwd=home, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env={**env0, "PORT": str(port), "BIND_HOST": host,
                     "FLEETWAVE_NODE": f"floor-{i}"}))

        await asyncio.gather(*(
            poll(functools.partial(probe_version, h, p, "/healthz"),
                 # answered below 500 (the health path's body is not the version's JSON)
                 lambda answer: answer == "<not json>" or not answer.startswith("<"),
                 timeout=60,
                 what=f"{h}:{p} healthy", interval=0.02)
            for h, p in addrs))
        return time.perf_counter() - started
    finally:
        await asyncio.gather(*(stop_process(proc) for proc in procs))


# What the CLI imports, alone: the interpreter, asyncio, nats-py (without what the CLI keeps
# out of it: ``protocol.imports``), click and msgspec, the best way (the collector off, no
# teardown at the end, as ``coordinator.console`` does). The CLI cannot start faster.
CLI_LIBRARIES = ("import gc, os, sys\ngc.disable()\nsys.modules['aiohttp'] = None\n"
                 "sys.modules['importlib.metadata'] = None\n"
                 "import asyncio, nats, click, msgspec\nos._exit(0)")
CLI_START = ("import sys\nsys.argv[1:] = ['deploy', '--help']\n"
             "from coordinator.console import run\nrun()")
CLI_RUNS = 15


async def cli_floor() -> dict[str, float]:
    """The median wall time of starting the CLI as far as ``deploy --help`` (every import a
    deploy makes), and of importing its libraries alone, in alternation, ``CLI_RUNS`` each."""
    times: dict[str, list[float]] = {"cli_start_s": [], "cli_libraries_s": []}
    for _ in range(CLI_RUNS):
        for key, code in (("cli_start_s", CLI_START), ("cli_libraries_s", CLI_LIBRARIES)):
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{key}: {err.decode(errors='replace')[-300:]}")
            times[key].append(time.perf_counter() - started)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


async def measure(n: int, rate: float, binary: str, repeat: int = 1) -> dict[str, Any]:
    with run_dir("fw-perf-vs-ansible-") as tmp:
        ansible = await measure_ansible(tmp, n, rate, binary, repeat)
        fleetwave = await measure_fleetwave(tmp, n, rate, repeat)
        floor = await start_floor(tmp, n)
        cli = await cli_floor()
    return {"nodes": n, "batch": BATCH, "load_per_host_rps": WORKERS * rate, "repeat": repeat,
            "ansible": ansible, "fleetwave": fleetwave, **ratios(ansible, fleetwave),
            "start_floor_s": round(floor, 2), **cli}


def ratios(a: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
    """Ansible's time over fleetwave's: the two commands' wall times (``ratio``); their work
    alone (``ratio_work``: Ansible from its first play header to its recap, fleetwave from
    rollout.started to rollout.succeeded, i.e. without either CLI's start-up and exit); and
    both again with the pre-stageable seconds taken off fleetwave's; and both for the run with
    Ansible's health check (``same_check``)."""
    a_work = a["seconds"] - a["tasks_s"].get("start-up", 0.0) - a["tasks_s"].get("recap", 0.0)

    def over(x: float, y: float) -> float | None:
        return round(x / y, 2) if y > 0 else None

    return {"ratio": over(a["seconds"], f["seconds"]),
            "ratio_work": over(a_work, f["engine_s"]),
            "ratio_prestaged": {k: over(a["seconds"], p["seconds"])
                                for k, p in f["prestaged"].items()},
            "ratio_work_prestaged": {k: over(a_work, p["engine_s"])
                                     for k, p in f["prestaged"].items()},
            "ratio_same_check": over(a["seconds"], f["same_check"]["seconds"]),
            "ratio_same_check_runs": [over(x, y) for x, y in zip(
                a["runs_s"], f["same_check"]["runs_s"], strict=True)],
            "ratio_work_same_check": over(a_work, f["same_check"]["engine_s"]),
            "ratio_if_prestaged": over(a["seconds"], f["seconds"] - f["prestageable_s"]),
            "ratio_work_if_prestaged": over(a_work, f["engine_s"] - f["prestageable_s"])}


def x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.1f}x"


def runs(figures: dict[str, Any]) -> str:
    """' (median of 3: 7.1, 7.4, 7.8 s)' when a side ran more than once, else ''."""
    times = figures["runs_s"]
    if len(times) < 2:
        return ""
    return f" (median of {len(times)}: " + ", ".join(f"{t:.2f}" for t in times) + " s)"


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    a, f = r["ansible"], r["fleetwave"]
    out = [
        ("load", f"{r['load_per_host_rps']:g} req/s a host ({WORKERS} workers), "
                 f"failures counted to {TAIL:g} s after the deploy"),
        ("Ansible (serial 20 %, local)", f"{a['seconds']:.2f} s{runs(a)}, {a['batches']} "
                                         f"batches, {a['failed']} of {a['requests']} requests "
                                         "failed"),
        ("fleetwave (rolling 20 %)", f"{f['seconds']:.2f} s, {len(f['waves'])} waves, "
                                     f"{f['failed']} of {f['requests']} requests failed"),
        ("fleetwave's CLI vs engine", f"rollout.started -> succeeded {f['engine_s']:.2f} s; "
                                      f"CLI before it {f['cli_before_start_s']:.2f} s, after "
                                      f"{f['cli_after_end_s']:.2f} s"),
        ("Ansible / fleetwave", f"{x(r['ratio'])} (wall); {x(r['ratio_work'])} without "
                                "either CLI's start-up and exit"),
        ("Ansible's tasks", ", ".join(f"{k} {v:.2f} s" for k, v in a["tasks_s"].items())),
        ("Ansible's CPU", cpu_line(a["cpu_s"], a["seconds"])),
        ("fleetwave's CPU", cpu_line(f["cpu_s"], f["seconds"])),
    ]
    for w in f["waves"]:
        out.append((f"fleetwave wave {w['wave']} ({w['nodes']} nodes)",
                    f"slots started {w['started_s']:.2f} s, healthy {w['healthy_s']:.2f} s, "
                    f"done {w['done_s']:.2f} s, next wave {w['next_s']:.2f} s"))
    out.append(("pre-stageable (waves 2+: to healthy)",
                f"{f['prestageable_s']:.2f} s; without it {x(r['ratio_if_prestaged'])} "
                f"(wall), {x(r['ratio_work_if_prestaged'])} (work)"))
    for ahead, p in f["prestaged"].items():
        out.append((f"fleetwave --prestage {ahead}",
                    f"{p['seconds']:.2f} s, {p['failed']} of {p['requests']} requests failed; "
                    f"engine {p['engine_s']:.2f} s, CLI before {p['cli_before_start_s']:.2f} s, "
                    f"after {p['cli_after_end_s']:.2f} s; Ansible / it "
                    f"{x(r['ratio_prestaged'][ahead])} (wall), "
                    f"{x(r['ratio_work_prestaged'][ahead])} (work)"))
        out.append((f"  its waves (--prestage {ahead})",
                    ", ".join(f"{w['next_s']:.2f}" for w in p["waves"]) + " s each"))
        out.append((f"  its CPU (--prestage {ahead})", cpu_line(p["cpu_s"], p["seconds"])))
    same = f["same_check"]
    out.append(("fleetwave --prestage all, Ansible's health check",
                f"{same['seconds']:.2f} s{runs(same)}, {same['failed']} of {same['requests']} "
                f"requests failed; engine {same['engine_s']:.2f} s, CLI before "
                f"{same['cli_before_start_s']:.2f} s, after {same['cli_after_end_s']:.2f} s; "
                f"Ansible / it {x(r['ratio_same_check'])} (wall), "
                f"{x(r['ratio_work_same_check'])} (work): {SAME}, {NEW} healthy at the first "
                "answer polled every 0.1 s, as the playbook checks it (the example: two passes "
                "200 ms apart)"))
    if len(same["runs_s"]) > 1:
        out.append(("  Ansible / it, run by run", ", ".join(
            x(v) for v in r["ratio_same_check_runs"]) + f" (Ansible's run i over fleetwave's; "
            f"the figures above are each side's median run of {len(same['runs_s'])})"))
    out.append(("  its CPU", cpu_line(same["cpu_s"], same["seconds"])))
    out.append(("python3", f"{r['python3']} (the example's interpreter, both tools)"))
    out.append(("start floor", f"{r['start_floor_s']:.2f} s: {r['nodes']} processes of "
                               f"{NEW} spawned at once, to the last one healthy (no load, no "
                               "fleetwave); what a staged first wave cannot beat"))
    out.append(("start floor under the load", f"{f['start_floor_loaded_s']:.2f} s: the same, "
                "with the load on the fleet serving 1.0.0 (its routers, agents and services "
                "running), as a rollout's first wave has it"))
    out.append(("CLI start", f"{r['cli_start_s'] * 1000:.0f} ms to deploy's every import "
                f"(median of {CLI_RUNS}); its libraries alone {r['cli_libraries_s'] * 1000:.0f}"
                " ms (python, asyncio, nats-py, click, msgspec)"))
    floors = r["cli_libraries_s"] + f["start_floor_loaded_s"] + 0.05
    out.append(("floors, summed", f"{floors:.2f} s: the CLI's libraries + the start floor "
                f"under the load + half a 0.1 s health poll; fleetwave with Ansible's check "
                f"{same['seconds']:.2f} s, Ansible / 10 = {a['seconds'] / 10:.2f} s"))
    for side, figs in (("Ansible", a), ("fleetwave", f)):
        if figs["failures"]:
            out.append((f"{side}: first failures", "; ".join(figs["failures"][:3])))
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10,
                    help=f"hosts on each side, 1 to {MAX_NODES} (default 10)")
    ap.add_argument("--rate", type=float, default=20.0,
                    help=f"requests/s of each of the {WORKERS} load workers a host (default 20)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the head-to-head pair (Ansible's update, fleetwave's --prestage "
                         "all with Ansible's health check) this many times, 1 to "
                         f"{MAX_REPEAT}, and report each side's median run (default 1)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    if not 1 <= args.repeat <= MAX_REPEAT:
        ap.error(f"--repeat {args.repeat} is out of range; use 1 to {MAX_REPEAT}")
    if not 1 <= args.nodes <= MAX_NODES:
        ap.error(f"--nodes {args.nodes} is out of range; use 1 to {MAX_NODES}")
    if not args.rate > 0:
        ap.error(f"--rate {args.rate:g} must be above 0 requests/s")
    binary = ansible_playbook()
    if binary is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    python3 = real_python3()
    r = {**await measure(args.nodes, args.rate, binary, args.repeat), "python3": python3}
    emit(args.json, f"in-place rolling update of {r['nodes']} hosts, 1.0.0 -> 2.0.0: Ansible "
         "vs fleetwave, same run, same load", r, rows(r))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
