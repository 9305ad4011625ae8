"""Slot supervision: real processes started, probed, restarted, failed, stopped and adopted."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import shutil
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.host import child, probes, slots
from agent.host.identity import RunAs
from agent.host.ports import free_port
from agent.host.processes import process_matches
from agent.host.slots import CrashPolicy, SlotRunner, SlotSpec
from protocol.manifest import HealthConfig, HooksConfig, Manifest, StopConfig
from tests.integration.procs import execed, hello_bundle, wait_until


@pytest.fixture
def release(tmp_path: Path) -> Path:
    d = tmp_path / "release"
    shutil.copytree(hello_bundle("1.0.0"), d)
    return d


def _manifest(
    release: Path,
    *,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    hooks: HooksConfig | None = None,
    stop_timeout: float = 5.0,
) -> Manifest:
    return Manifest(
        name="hello",
        version="1.0.0",
        port=8080,
        command=command or [sys.executable, "app.py"],
        env=env or {},
        health=HealthConfig(
            http="/healthz", interval=0.05, timeout=1, healthy_threshold=1, unhealthy_threshold=2
        ),
        stop=StopConfig(drain=0.1, timeout=stop_timeout),
        hooks=hooks or HooksConfig(),
    )


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    def __call__(self, runner: SlotRunner, kind: str, message: str) -> None:
        self.seen.append((kind, message))
        self.changed.set()

    async def until(self, cond: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.1)


@pytest.fixture
async def runners() -> AsyncIterator[list[tuple[SlotRunner, asyncio.Task[None]]]]:
    made: list[tuple[SlotRunner, asyncio.Task[None]]] = []
    gc.collect()
    yield made
    for r, t in made:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
        if r.pid is not None and r.create_time and process_matches(r.pid, r.create_time):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.pid, 9)
        if r._proc is not None:
            await asyncio.wait_for(r._proc.wait(), 5)
    await _reaped()
    gc.collect()  # a child nobody reaped would warn now, in the test that leaked it


async def _reaped() -> None:
    """Wait (bounded) for background kills of cancelled hooks and probes to reap their child."""
    async with asyncio.timeout(10):
        await asyncio.gather(*probes._reaping, return_exceptions=True)


def _spec(release: Path, tmp_path: Path, manifest: Manifest, slot: str = "a") -> SlotSpec:
    return SlotSpec(
        service="hello",
        slot=slot,
        node="n1",
        release_dir=release,
        manifest=manifest,
        digest="sha256:x",
        port=free_port(),
        log_dir=tmp_path / "logs",
    )


async def _slot_like(spec: SlotSpec, argv: tuple[str, ...] = ("sleep", "60"), *,
                     cwd: Path | None = None, session: bool = True, without: str = "",
                     **env: str) -> asyncio.subprocess.Process:
    """``argv`` started as the runner starts ``spec``'s process (its own session, in its release
    dir, its env), for adoption; ``cwd``, ``session``, ``env`` and ``without`` (a variable left
    out) change what it looks like."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd or spec.release_dir,
        env={k: v for k, v in {**spec.env(), **env}.items() if k != without},
        start_new_session=session)
    await execed(proc.pid)
    return proc


def _start(runners: list, spec: SlotSpec, events: Events, **kw) -> SlotRunner:
    r = SlotRunner(spec, events, **kw)
    runners.append((r, asyncio.create_task(r.run())))
    return r


async def test_slot_starts_healthy_with_its_env_in_its_own_session(
    release, tmp_path, runners
) -> None:
    """The process gets PORT and FLEETWAVE_* env, its own session, and becomes healthy."""
    ev = Events()
    spec = _spec(release, tmp_path, _manifest(release, env={"GREETING": "hey"}))
    r = _start(runners, spec, ev)
    await ev.until(lambda: r.status == "healthy")
    assert r.pid is not None and os.getsid(r.pid) == r.pid
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{spec.port}/", timeout=5).read()
    )
    assert b'"slot": "a"' in body or b'"slot":"a"' in body
    assert b"hey" in body and b"n1" in body
    assert [k for k, _ in ev.seen][:2] == ["slot.started", "slot.healthy"]
    rss, _cpu = r.figures()
    assert rss > 0


async def test_stop_terminates_and_reaps(release, tmp_path, runners) -> None:
    """stop() sends SIGTERM, the process exits and is reaped, the slot is stopped."""
    ev = Events()
    r = _start(runners, _spec(release, tmp_path, _manifest(release)), ev)
    await ev.until(lambda: r.status == "healthy")
    pid = r.pid
    await asyncio.wait_for(r.stop(5.0), 10)
    assert r.status == "stopped" and r.last_exit == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


async def test_stop_kills_a_process_that_ignores_sigterm(release, tmp_path, runners) -> None:
    """A process ignoring SIGTERM is SIGKILLed after stop.timeout."""
    (release / "stubborn.py").write_text(
        "import signal, time, pathlib\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path('ready').touch()\ntime.sleep(60)\n"
    )
    m = _manifest(release, command=[sys.executable, "stubborn.py"])
    m.health.http = None  # healthy once the SIGTERM handler is in place
    m.health.exec = [sys.executable, "-c", "import os,sys; sys.exit(not os.path.exists('ready'))"]
    ev = Events()
    r = _start(runners, _spec(release, tmp_path, m), ev)
    await ev.until(lambda: r.status == "healthy")
    await asyncio.wait_for(r.stop(0.5), 10)
    assert r.status == "stopped" and r.last_exit == -9


async def test_crash_loop_fails_with_the_last_exit_status(release, tmp_path, runners) -> None:
    """A service that keeps exiting is restarted with backoff, then fails naming its status."""
    ev = Events()
    m = _manifest(release, env={"CRASH_AFTER_S": "0.05"})
    r = _start(
        runners,
        _spec(release, tmp_path, m),
        ev,
        policy=CrashPolicy(max_restarts=3, window=60, first=0.05, cap=0.2),
    )
    await ev.until(lambda: r.status == "failed")
    assert r.restarts == 3
    assert "crash loop" in r.reason and "exited with status 3" in r.reason
    assert r.last_exit == 3
    assert [k for k, _ in ev.seen].count("slot.crashed") == 3


async def test_failing_pre_start_hook_fails_the_slot(release, tmp_path, runners) -> None:
    """A pre_start hook that fails keeps the service from starting and names status and output."""
    (release / "migrate.py").write_text(
        "print('migrating'); print('db locked'); raise SystemExit(4)\n"
    )
    ev = Events()
    m = _manifest(release, hooks=HooksConfig(pre_start=[sys.executable, "migrate.py"]))
    r = _start(runners, _spec(release, tmp_path, m), ev)
    await ev.until(lambda: r.status == "failed")
    assert r.pid is None
    assert r.reason == "hooks.pre_start exited with status 4: db locked"


@pytest.mark.parametrize("after", ["print('db locked')", ""])
async def test_a_hook_that_writes_without_end_has_its_log_capped(
    release, tmp_path, runners, monkeypatch: pytest.MonkeyPatch, after: str,
) -> None:
    """A hook's log is capped while it runs, as a service's is (a hook that wrote 2 GB filled
    the disk of the state file, and reading the log whole took the agent to 1.9 GiB); the
    failure still names its last line, from the capped-off tail when it wrote none since."""
    monkeypatch.setattr(slots, "LOG_CAP_EVERY", 0.05)
    # Exactly the cap's size first (no cap yet), then the last line in one small write that
    # takes the log past it, so that a cap's tail ends with that line. (One large write did
    # not do: a cap can read the log while a write of megabytes is half done, its tail then
    # ending in x's; CI saw it.) Then the cap awaited (its tail appears beside the log;
    # bounded), then the exit with a last line or none.
    lines, rest = divmod(slots.LOG_MAX_BYTES, 100)
    assert rest >= 1  # (a last line of ``rest`` bytes pads it to the cap's size exactly)
    (release / "migrate.py").write_text(
        "import os, time\n"
        f"os.write(1, (b'x' * 99 + b'\\n') * {lines} + b'x' * {rest - 1} + b'\\n')\n"
        "os.write(1, b'db locked\\n')\n"
        "tail = os.readlink('/proc/self/fd/1') + '.1'\n"
        "deadline = time.monotonic() + 20\n"
        "while not os.path.exists(tail) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        f"{after}\n"
        "raise SystemExit(4)\n")
    ev = Events()
    m = _manifest(release, hooks=HooksConfig(pre_start=[sys.executable, "migrate.py"]))
    spec = _spec(release, tmp_path, m)
    r = _start(runners, spec, ev)
    await ev.until(lambda: r.status == "failed", timeout=30)
    assert r.reason == "hooks.pre_start exited with status 4: db locked"
    hook_log = spec.log_dir / "hello-a.pre_start.log"
    assert hook_log.stat().st_size <= slots.LOG_MAX_BYTES
    assert hook_log.with_name(hook_log.name + ".1").stat().st_size <= slots.LOG_MAX_BYTES


async def test_hung_hook_is_killed_at_its_timeout(release, tmp_path, runners) -> None:
    """A hook that does not finish within hooks.timeout is killed and fails the slot."""
    ev = Events()
    hooks = HooksConfig(
        pre_start=[sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.3
    )
    r = _start(runners, _spec(release, tmp_path, _manifest(release, hooks=hooks)), ev)
    await ev.until(lambda: r.status == "failed")
    assert "did not finish within 0.3s" in r.reason


async def test_failing_validate_hook_fails_after_health(release, tmp_path, runners) -> None:
    """validate runs once probes pass; failing it fails the slot and stops the process."""
    ev = Events()
    hooks = HooksConfig(
        validate=[sys.executable, "-c", "print('smoke failed'); raise SystemExit(1)"]
    )
    r = _start(runners, _spec(release, tmp_path, _manifest(release, hooks=hooks)), ev)
    await ev.until(lambda: r.status == "failed")
    assert r.reason == "hooks.validate exited with status 1: smoke failed"
    assert "slot.healthy" not in [k for k, _ in ev.seen]
    await ev.until(lambda: r._proc is not None and r._proc.returncode is not None)


async def test_missing_program_fails_the_slot(release, tmp_path, runners) -> None:
    """A command that cannot be executed fails the slot with the OS reason."""
    ev = Events()
    m = _manifest(release, command=["./does-not-exist"])
    r = _start(runners, _spec(release, tmp_path, m), ev)
    await ev.until(lambda: r.status == "failed")
    assert "cannot start ./does-not-exist" in r.reason


async def test_port_and_fleetwave_variables_fill_command_probe_and_hooks(
    release, tmp_path, runners
) -> None:
    """A server that takes its port as an argument serves on the slot's private port: ${PORT}
    fills the command, the exec probe and both hooks get the same values, and $$ stays a $."""
    record = "import sys; open(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))"
    connect = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)"
    m = Manifest(
        name="hello", version="1.0.0", port=8080,
        # http.server reads its port from argv only: it serves there only if ${PORT} was filled
        command=[sys.executable, "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"],
        health=HealthConfig(exec=[sys.executable, "-c", connect, "${PORT}"], interval=0.05,
                            timeout=1, healthy_threshold=1, unhealthy_threshold=2),
        stop=StopConfig(drain=0.1, timeout=5),
        hooks=HooksConfig(
            pre_start=[sys.executable, "-c", record, "pre", "${FLEETWAVE_NODE}",
                       "${FLEETWAVE_SLOT}", "${FLEETWAVE_VERSION}", "$${PORT}"],
            validate=[sys.executable, "-c", record, "validate", "port=${PORT}"],
        ),
    )
    ev = Events()
    spec = _spec(release, tmp_path, m, slot="b")
    r = _start(runners, spec, ev)
    await ev.until(lambda: r.status == "healthy")
    assert r.pid is not None and psutil.Process(r.pid).cmdline()[-3:] == [
        str(spec.port), "--bind", "127.0.0.1"]
    status = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{spec.port}/", timeout=5).status
    )
    assert status == 200
    assert (release / "pre").read_text() == "n1 b 1.0.0 ${PORT}"
    assert (release / "validate").read_text() == f"port={spec.port}"


async def test_an_unfillable_command_fails_the_slot_with_the_reason(
    release, tmp_path, runners
) -> None:
    """A manifest that skipped validation (built by hand, or by an older agent) and names an
    unknown ${X} fails the slot with one line naming the argument; nothing is started."""
    ev = Events()
    m = _manifest(release, command=[sys.executable, "app.py", "--x=${NOPE}"])
    r = _start(runners, _spec(release, tmp_path, m), ev)
    await ev.until(lambda: r.status == "failed")
    assert r.pid is None
    assert r.reason.startswith("command: argument 2 '--x=${NOPE}': ${NOPE} is not a variable")


async def _left_running(release, tmp_path, runners, ev: Events) -> tuple[SlotSpec, SlotRunner]:
    """A healthy slot whose supervisor was cancelled: its process runs on, to be adopted."""
    spec = _spec(release, tmp_path, _manifest(release))
    r = _start(runners, spec, ev)
    await ev.until(lambda: r.status == "healthy")
    runners[-1][1].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runners[-1][1]
    return spec, r


async def test_process_survives_the_supervisor_and_is_adopted(release, tmp_path, runners) -> None:
    """Cancelling the supervisor leaves the process running; adopt() finds it by pid+create_time."""
    ev = Events()
    spec, r = await _left_running(release, tmp_path, runners, ev)
    assert r.pid is not None and r.create_time is not None
    assert process_matches(r.pid, r.create_time)

    assert SlotRunner.adopt(spec, r.pid, r.create_time + 5, ev, status="healthy", since=0) is None
    adopted = SlotRunner.adopt(spec, r.pid, r.create_time, ev, status="healthy", since=1.0)
    assert adopted is not None and adopted.status == "healthy"
    runners.append((adopted, asyncio.create_task(adopted.run())))
    await asyncio.wait_for(adopted.stop(5.0), 10)
    assert adopted.status == "stopped"
    await asyncio.wait_for(r._proc.wait(), 5)  # we are still its parent in this test: reap it
    assert not process_matches(r.pid, r.create_time)


async def test_adopted_process_exit_is_noticed_and_restarted(release, tmp_path, runners) -> None:
    """An adopted process that dies is seen by polling and the slot is started again."""
    ev = Events()
    spec, r = await _left_running(release, tmp_path, runners, ev)
    adopted = SlotRunner.adopt(spec, r.pid, r.create_time, ev, status="healthy", since=1.0)
    assert adopted is not None
    adopted.policy = CrashPolicy(first=0.05)
    runners.append((adopted, asyncio.create_task(adopted.run())))
    os.killpg(r.pid, 9)
    await asyncio.wait_for(r._proc.wait(), 5)
    await ev.until(lambda: adopted.restarts == 1 and adopted.status == "healthy")
    assert adopted.pid != r.pid


async def test_an_adopted_slot_is_not_started_again_once_the_agent_stops(
    release, tmp_path, runners
) -> None:
    """The agent stops (``halted``) and an adopted slot's process dies: its runner ends, the
    slot not started again (the next agent starts it from its state file)."""
    ev = Events()
    spec, r = await _left_running(release, tmp_path, runners, ev)
    adopted = SlotRunner.adopt(spec, r.pid, r.create_time, ev, status="healthy", since=1.0,
                               halted=lambda: True)
    assert adopted is not None
    adopted.policy = CrashPolicy(first=0.05)
    runners.append((adopted, asyncio.create_task(adopted.run())))
    os.killpg(r.pid, 9)
    await asyncio.wait_for(r._proc.wait(), 5)
    await asyncio.wait_for(asyncio.shield(runners[-1][1]), 10)  # its supervisor ended
    assert adopted.restarts == 0 and adopted.pid == r.pid  # not started, nor counted
    assert [k for k, _ in ev.seen].count("slot.started") == 1  # the first runner's only


@pytest.mark.parametrize(("looks", "why"), [
    ("started elsewhere", "its FLEETWAVE_RELEASE_DIR is '{tmp}', not '{release}'"),
    ("an older agent's, elsewhere", "it works in {tmp}, not in {release}"),
    ("in no session of its own", "it does not lead its own session"),
    ("of another node", "its FLEETWAVE_NODE is 'n2', not 'n1'"),
    ("of another slot", "its FLEETWAVE_SLOT is 'b', not 'a'"),
])
async def test_a_live_process_that_is_not_the_slots_is_not_adopted(
    looks: str, why: str, release: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state file's pid and create_time name a live process, but not one that looks like
    this slot's (a session leader in its release dir with this node's and slot's FLEETWAVE_*):
    adopt() refuses it with one line saying why, so nothing ever signals its group. A review
    found any process named by a state file adopted, and SIGTERMed at the next deploy."""
    spec = _spec(release, tmp_path, _manifest(release))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = await _slot_like(
        spec, cwd=elsewhere if "elsewhere" in looks else None,
        session=looks != "in no session of its own",
        without="FLEETWAVE_RELEASE_DIR" if looks == "an older agent's, elsewhere" else "",
        **{"of another node": {"FLEETWAVE_NODE": "n2"},
           "of another slot": {"FLEETWAVE_SLOT": "b"},
           "started elsewhere": {"FLEETWAVE_RELEASE_DIR": str(elsewhere)}}.get(looks, {}))
    try:
        created = psutil.Process(proc.pid).create_time()
        with caplog.at_level("INFO", "fleetwave.agent.slots"):
            adopted = SlotRunner.adopt(spec, proc.pid, created, Events(), status="healthy",
                                       since=1.0)
        assert adopted is None
        said = why.format(tmp=elsewhere, release=release)
        assert [r.getMessage() for r in caplog.records] == [
            f"slot hello/a (pid {proc.pid}) is not adopted: {said}; the slot will be started "
            "again"]
        assert proc.returncode is None
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 5)


@pytest.mark.parametrize("through", ["its release dir", "a symlink to it"])
@pytest.mark.parametrize("moved", [False, True])
async def test_a_slot_that_moved_away_from_its_release_dir_is_adopted(
    moved: bool, through: str, release: Path, tmp_path: Path
) -> None:
    """Many servers chdir once started (a daemon to /, ``gunicorn --chdir``): the slot's
    ``FLEETWAVE_RELEASE_DIR`` says where it was started, so the restarted agent adopts it
    instead of starting it again beside the one still holding its port (a review found such a
    slot left running unwatched, for good). A data dir reached through a symlink is ours too."""
    link = tmp_path / "link"
    link.symlink_to(release)
    spec = _spec(release if through == "its release dir" else link, tmp_path,
                 _manifest(release))
    proc = await _slot_like(spec, cwd=Path("/") if moved else None)
    try:
        created = psutil.Process(proc.pid).create_time()
        adopted = SlotRunner.adopt(spec, proc.pid, created, Events(), status="healthy",
                                   since=1.0)
        assert adopted is not None and adopted.pid == proc.pid
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 5)


async def test_a_stop_just_after_the_leader_exited_ends_what_is_left_of_its_group(
    release: Path, tmp_path: Path, runners, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's leader exits on its own, leaving a worker in its group, and stop() lands
    before the runner has ended that group (its watch still winding down: a probe being
    cancelled): the stop ends the worker, which would keep the slot's port. A review found it
    left running (the stop took the slot for gone, and the runner then saw the stop)."""
    command = ["sh", "-c", "sleep 60 & echo $! > worker.pid; exit 0"]
    held, go = asyncio.Event(), asyncio.Event()
    real = SlotRunner._watch

    async def slow_watch(self: SlotRunner) -> int | None:
        code = await real(self)
        held.set()
        await go.wait()  # the watch's wind-down, held for the stop to land in
        return code

    monkeypatch.setattr(SlotRunner, "_watch", slow_watch)
    r = _start(runners, _spec(release, tmp_path, _manifest(release, command=command)), Events())
    await asyncio.wait_for(held.wait(), 10)
    worker = int((release / "worker.pid").read_text())
    assert not _gone(worker)
    try:
        await asyncio.wait_for(r.stop(2.0), 10)
        assert _gone(worker), "the crashed leader's worker outlived the stop"
    finally:
        go.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, 9)


async def test_a_slot_adopted_as_another_user_than_its_own_is_said(
    release: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slot's user changed since it started (--service-user SERVICE=USER given since): it is
    adopted and serves on as it was, and one line says so and when it changes (a review found
    it silent)."""
    spec = _spec(release, tmp_path, _manifest(release))
    proc = await _slot_like(spec)
    try:
        other = RunAs("other", os.geteuid() + 4242, os.getegid(), "/")
        apart = dataclasses.replace(spec, run_as=other)
        created = psutil.Process(proc.pid).create_time()
        with caplog.at_level("WARNING", "fleetwave.agent.slots"):
            adopted = SlotRunner.adopt(apart, proc.pid, created, Events(), status="healthy",
                                       since=1.0)
        assert adopted is not None and adopted.pid == proc.pid
        assert (f"slot hello/a (pid {proc.pid}) runs as uid {os.geteuid()}, not "
                f"{os.geteuid() + 4242} as its user now is") in caplog.text
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 5)


@pytest.mark.parametrize("unreadable", ["cwd", "environ"])
async def test_a_slot_whose_proc_files_cannot_be_read_is_adopted_if_it_runs_as_the_services_user(
    unreadable: str, release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the agent may not read a process's working directory or environment
    (AccessDenied), a session leader is adopted only if it runs as the services' user, and what
    could be read still has to match. (The working directory is read only for an older agent's
    process, without FLEETWAVE_RELEASE_DIR.)"""
    spec = _spec(release, tmp_path, _manifest(release))
    proc = await _slot_like(spec, without="FLEETWAVE_RELEASE_DIR" if unreadable == "cwd" else "")
    try:
        def denied(self: psutil.Process) -> None:
            raise psutil.AccessDenied(self.pid)

        monkeypatch.setattr(psutil.Process, unreadable, denied)
        created = psutil.Process(proc.pid).create_time()
        assert SlotRunner.adopt(spec, proc.pid, created, Events(), status="healthy",
                                since=1.0) is not None
        other = RunAs("other", os.geteuid() + 4242, os.getegid(), "/")
        apart = dataclasses.replace(spec, run_as=other)
        assert SlotRunner.adopt(apart, proc.pid, created, Events(), status="healthy",
                                since=1.0) is None
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 5)


async def test_an_adopted_healthy_slot_that_stopped_answering_turns_unhealthy(
        release, tmp_path, runners) -> None:
    """After the agent's restart, a slot adopted as healthy whose process lives on but no longer
    answers (nothing listens on its port) turns unhealthy after ``unhealthy_threshold`` failed
    probes, as a slot the agent saw healthy would, so that it is healed. A review found it
    stayed "healthy" for ever while its port was polled 50 times a second as a starting
    slot's."""
    ev = Events()
    spec = _spec(release, tmp_path, _manifest(release))
    proc = await _slot_like(spec)
    try:
        created = psutil.Process(proc.pid).create_time()
        adopted = SlotRunner.adopt(spec, proc.pid, created, ev, status="healthy", since=1.0)
        assert adopted is not None and adopted.status == "healthy"
        runners.append((adopted, asyncio.create_task(adopted.run())))
        await ev.until(lambda: adopted.status == "unhealthy", timeout=10)
        assert [k for k, _ in ev.seen] == ["slot.unhealthy"], ev.seen
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await asyncio.wait_for(proc.wait(), 5)


@pytest.mark.parametrize("how", ["stop", "fail"])
async def test_stop_or_fail_during_a_hook_kills_the_hook_at_once(
    how: str, release, tmp_path, runners
) -> None:
    """stop() or fail() while a pre_start hook runs (a migration that hangs) kills the hook's
    process group then and there: the supervisor ends within the stop's timeout, not the
    hook's (60 s), and nothing of the hook is left running."""
    hooks = HooksConfig(
        pre_start=[
            sys.executable, "-c",
            "import os, pathlib, time; pathlib.Path('hook.pid').write_text(str(os.getpid())); "
            "time.sleep(60)",
        ]
    )
    ev = Events()
    r = _start(runners, _spec(release, tmp_path, _manifest(release, hooks=hooks)), ev)
    await ev.until(lambda: (release / "hook.pid").exists() and
                   (release / "hook.pid").read_text() != "")
    hook = psutil.Process(int((release / "hook.pid").read_text()))
    loop = asyncio.get_running_loop()
    began = loop.time()
    if how == "stop":
        await asyncio.wait_for(r.stop(1.0), 10)
    else:
        await asyncio.wait_for(r.fail("not healthy in time"), 10)
    await asyncio.wait_for(asyncio.shield(runners[-1][1]), 10)
    took = loop.time() - began
    assert took < 3.0, f"the supervisor waited {took:.1f}s for the hook"
    assert not hook.is_running() or hook.status() == psutil.STATUS_ZOMBIE
    assert r.pid is None and r.status == ("stopped" if how == "stop" else "failed")
    assert "slot.started" not in [k for k, _ in ev.seen]


@pytest.mark.parametrize("how", ["stop", "fail"])
async def test_stop_or_fail_during_pre_start_hook_starts_no_process(
    how: str, release, tmp_path, runners
) -> None:
    """A slot stopped or failed while its pre_start hook runs never spawns the service after it."""
    hooks = HooksConfig(
        pre_start=[
            sys.executable, "-c",
            "import pathlib, time; pathlib.Path('hook-started').touch(); time.sleep(1)",
        ]
    )
    ev = Events()
    r = _start(runners, _spec(release, tmp_path, _manifest(release, hooks=hooks)), ev)
    await ev.until(lambda: (release / "hook-started").exists())
    if how == "stop":
        await asyncio.wait_for(r.stop(1.0), 10)
    else:
        await asyncio.wait_for(r.fail("not healthy in time"), 10)
    await asyncio.wait_for(asyncio.shield(runners[-1][1]), 20)
    assert r.pid is None and r._proc is None
    assert r.status == ("stopped" if how == "stop" else "failed")
    assert "slot.started" not in [k for k, _ in ev.seen]


@pytest.mark.parametrize("how", ["stop", "fail", "halt"])
async def test_stop_or_fail_while_a_restart_waits_starts_nothing(
    how: str, release, tmp_path, runners, monkeypatch
) -> None:
    """stop() or fail() that lands while a crashed slot waits for its restart (the last await
    before a start; the start itself does not await) starts no process and reports no start. A
    review had found a process started under a stopped slot, its supervisor waiting on it for
    ever. The same when the agent stops meanwhile (``halted``): its supervisor ends, the slot
    left as it is for the next agent."""
    command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    started: list[int] = []
    real = child.start

    def counted(argv: list[str], **kw: Any) -> child.Child:
        proc = real(argv, **kw)
        started.append(proc.pid)
        return proc

    monkeypatch.setattr(child, "start", counted)
    ev = Events()
    spec = _spec(release, tmp_path, _manifest(release, command=command))
    halted = False
    r = _start(runners, spec, ev, policy=CrashPolicy(first=2.0),  # a backoff to land in
               halted=lambda: halted)
    await ev.until(lambda: ("slot.crashed" in [k for k, _ in ev.seen]))
    if how == "stop":
        await asyncio.wait_for(r.stop(1.0), 10)
    elif how == "fail":
        await asyncio.wait_for(r.fail("not healthy in time"), 10)
    else:
        halted = True
    await asyncio.wait_for(asyncio.shield(runners[-1][1]), 10)
    status = {"stop": "stopped", "fail": "failed", "halt": "starting"}[how]
    assert len(started) == 1 and r.status == status
    assert [k for k, _ in ev.seen].count("slot.started") == 1


async def test_a_slot_process_outlives_its_runner_and_event_loop(tmp_path: Path) -> None:
    """A slot's process outlives the agent: its runner cancelled, its event loop closed and
    every object of it collected, the process runs on (Python 3.13 killed it: asyncio's
    subprocess transport kills a child still running when it is collected, as the 3.13
    interpreter finalizes). Run in a fresh interpreter, as the agent's exit is."""
    script = tmp_path / "agent_like.py"
    script.write_text(AGENT_LIKE)
    out = tmp_path / "pid"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(tmp_path / "release"), str(out),
        cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    pid = int(out.read_text())
    try:
        assert not _gone(pid), "the slot's process died with the agent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, 9)


# An agent's life in short: a slot started by its runner, the runner cancelled (the agent's
# stop), the loop closed, everything collected (what Python 3.13 does as it exits).
AGENT_LIKE = """import asyncio, gc, shutil, sys
from pathlib import Path
from agent.host.slots import SlotRunner, SlotSpec
from agent.host.ports import free_port
from protocol.manifest import HealthConfig, Manifest, StopConfig

release, out = Path(sys.argv[1]), Path(sys.argv[2])
release.mkdir()
manifest = Manifest(name="hello", version="1.0.0", command=["sleep", "60"],
                    health=HealthConfig(), stop=StopConfig())
spec = SlotSpec(service="hello", slot="a", node="n1", release_dir=release, manifest=manifest,
                digest="sha256:x", port=None, log_dir=release.parent / "logs")

async def main() -> None:
    if sys.version_info < (3, 12):  # the child watcher of Python 3.12 and later, as 3.13 runs
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)
    started = asyncio.Event()
    runner = SlotRunner(spec, lambda r, kind, msg: kind == "slot.started" and started.set())
    task = asyncio.create_task(runner.run())
    async with asyncio.timeout(10):
        await started.wait()
    out.write_text(str(runner.pid))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

asyncio.run(main())
gc.collect()
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_left(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


async def test_what_hooks_and_exec_probes_leave_in_the_background_is_ended(
    release, tmp_path, runners
) -> None:
    """A pre_start hook and an exec probe (every 50 ms) that each start ``sleep &`` and exit 0
    leave nothing running: by the time the slot runs, the hook's sleep is gone, and by the time
    a probe runs, the sleeps of the probes before it. A review found one sleep left by the hook
    and one by every probe, outliving the slot and the agent."""
    def leaving(name: str) -> list[str]:
        return ["sh", "-c", f"sleep 300 & echo $! >> {name}; exit 0"]

    m = _manifest(release, command=["sleep", "60"], hooks=HooksConfig(pre_start=leaving("hook")))
    m.health.http = None
    m.health.exec = leaving("probes")
    ev = Events()
    r = _start(runners, _spec(release, tmp_path, m), ev)
    try:
        await ev.until(lambda: len(_pids(release / "probes")) >= 3)
        hook, probed = _pids(release / "hook"), _pids(release / "probes")
        assert len(hook) == 1 and _gone(hook[0])
        assert [pid for pid in probed[:-1] if not _gone(pid)] == []
        await asyncio.wait_for(r.stop(5.0), 10)
        await asyncio.wait_for(runners[-1][1], 10)  # its probe ended: SIGKILLed, if under way

        async def left() -> list[int]:
            return [pid for pid in _pids(release / "probes") if not _gone(pid)]

        await wait_until(left, lambda pids: pids == [], timeout=10, what="the last probe's sleep")
    finally:
        _kill_left(_pids(release / "hook") + _pids(release / "probes"))


def _pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


# A leader that dies of SIGTERM with a worker (in its process group) that ignores it, as a
# prefork server's worker finishing a request; each worker appends its pid to ``workers``.
LEADER_AND_WORKER = """
import os, subprocess, sys, time
from pathlib import Path

WORKER = (
    "import os, signal, time\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "with open('workers', 'a') as f: f.write(f'{os.getpid()}\\\\n')\\n"
    "time.sleep(60)\\n"
)
worker = subprocess.Popen([sys.executable, "-c", WORKER])
workers = Path("workers")
while not workers.exists() or str(worker.pid) not in workers.read_text().split():
    time.sleep(0.01)
Path("ready").touch()
if "EXIT" in os.environ:
    sys.exit(int(os.environ["EXIT"]))
time.sleep(60)
"""


def _workers(release: Path) -> list[int]:
    path = release / "workers"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("what", ["service", "pre_start hook"])
async def test_stop_kills_what_is_left_of_the_group_after_its_leader(
    what: str, release, tmp_path, runners
) -> None:
    """A leader that exits on SIGTERM leaves a worker that ignores it: the stop gives the worker
    what is left of the timeout, then SIGKILLs the group. A review found such a worker running
    on after the stop (holding the port), as a pre_start hook's did."""
    (release / "group.py").write_text(LEADER_AND_WORKER)
    argv = [sys.executable, "group.py"]
    if what == "service":
        m = _manifest(release, command=argv)
    else:
        m = _manifest(release, hooks=HooksConfig(pre_start=argv))
    ev = Events()
    r = _start(runners, _spec(release, tmp_path, m), ev)
    try:
        await ev.until(lambda: (release / "ready").exists())
        await asyncio.wait_for(r.stop(0.5), 10)
        assert r.status == "stopped"
        left = [pid for pid in _workers(release) if not _gone(pid)]
        assert _workers(release) and not left, f"still running after the stop: {left}"
    finally:
        _kill_left(_workers(release))


async def test_a_crashed_leaders_group_is_killed_before_the_restart(
    release, tmp_path, runners
) -> None:
    """A leader that crashes leaves its worker behind; the runner SIGKILLs the group before it
    restarts (the worker would keep the port) and before it fails a crash loop. A review found
    every crashed leader's worker left running."""
    (release / "group.py").write_text(LEADER_AND_WORKER)
    ev = Events()
    m = _manifest(release, command=[sys.executable, "group.py"], env={"EXIT": "3"})
    r = _start(runners, _spec(release, tmp_path, m), ev,
               policy=CrashPolicy(max_restarts=1, window=60, first=0.05, cap=0.05))
    try:
        await ev.until(lambda: r.status == "failed")
        assert "crash loop" in r.reason and "exited with status 3" in r.reason
        left = [pid for pid in _workers(release) if not _gone(pid)]
        assert len(_workers(release)) == 2 and not left, f"still running: {left}"
    finally:
        _kill_left(_workers(release))


async def test_a_slot_adopted_while_starting_is_validated(release, tmp_path, runners) -> None:
    """A slot adopted as "starting" (the agent restarted mid-rollout, before its validate hook
    ran) runs the hook once probes pass, and a failing hook fails it. A review found it made
    healthy without the hook."""
    m = _manifest(release, hooks=HooksConfig(
        validate=[sys.executable, "-c", "print('smoke failed'); raise SystemExit(1)"]))
    m.health.http = None
    m.health.exec = [sys.executable, "-c", ""]
    ev = Events()
    spec = _spec(release, tmp_path, m)
    proc = await _slot_like(spec)
    try:
        created = psutil.Process(proc.pid).create_time()
        adopted = SlotRunner.adopt(spec, proc.pid, created, ev, status="starting", since=1.0)
        assert adopted is not None
        runners.append((adopted, asyncio.create_task(adopted.run())))
        await ev.until(lambda: adopted.status in ("healthy", "failed"))
        assert adopted.reason == "hooks.validate exited with status 1: smoke failed"
        assert "slot.healthy" not in [k for k, _ in ev.seen]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await asyncio.wait_for(proc.wait(), 5)


# Spawns a child through spawn_kwargs of its own user, after dropping root as an agent started
# without it does (the imports come first: the interpreter may sit where nobody can read).
REPO = Path(__file__).resolve().parents[2]  # where the child imports agent from
OWN_USER_SPAWN = """
import asyncio, os
from agent.host.identity import RunAs, spawn_kwargs
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
own = RunAs("self", os.geteuid(), os.getegid(), "/")
async def main():
    try:
        proc = await asyncio.create_subprocess_exec("true", **spawn_kwargs(own))
    except OSError as exc:
        print(repr(exc))
    else:
        print("exit", await proc.wait())
asyncio.run(main())
"""


async def test_children_run_as_the_agents_own_user_start_without_root() -> None:
    """--service-user naming the agent's own user is a no-op: a non-root agent starts slots,
    hooks, probes and routers as before. A review found every spawn failing with EPERM (the
    child called setgroups(), which needs root even to drop nothing)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OWN_USER_SPAWN, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)
    assert out.decode().strip() == "exit 0", err.decode()
