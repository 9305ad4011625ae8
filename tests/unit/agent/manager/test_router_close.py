"""A removal's router on the manager's side: its state in the view, closing it, and a removed
service leaving the node's listing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.manager import routing
from agent.manager.routing import RouterLink
from agent.manager.service import NodeConfig, Service, settled
from protocol.messages import DesiredState


class Client:
    """Stands in for a RouterClient: records the shutdown."""

    def __init__(self) -> None:
        self.shutdowns = 0

    async def shutdown(self) -> None:
        self.shutdowns += 1


def link(tmp_path: Path, svc: Service) -> RouterLink:
    config = NodeConfig(fleet="f", node="n", data_dir=tmp_path, bind_host="127.0.62.1",
                        trusted_keys=frozenset())
    return RouterLink(config, {svc.name: svc}, asyncio.Event())


def removed_desired() -> DesiredState:
    return DesiredState(fleet="f", node="n", service="hello", generation=9)


def as_router(tmp_path: Path, seconds: float) -> subprocess.Popen[bytes]:
    """A process that sleeps ``seconds`` with a router's command line on hello's socket (what
    the agent checks before it waits for or kills a router's pid), once it says it runs: a
    process Popen has just returned is not always done with its exec, and until it is its
    command line reads empty (the kernel resumes the parent before it lays out the new argv),
    so the agent took it for no router at all (one run in 50 on Python 3.11, most runs of
    this file on 3.13)."""
    sock = routing.router_socket(tmp_path, "hello")
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import time; print('up', flush=True); time.sleep({seconds})",
                             "-m", "agent.router", "--control", str(sock)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    proc.stdout.close()
    return proc


def routed(client: Any, pid: int | None) -> Service:
    svc = Service(name="hello", desired=removed_desired())
    svc.router, svc.router_pid = client, pid
    svc.applied_weights = {"a": 100}
    return svc


def test_the_view_says_whether_a_router_runs_or_closes() -> None:
    """up while a router is known, closing while asked to exit, none after; closing is not
    settled (the loop keeps ticking until it is gone)."""
    svc = routed(Client(), None)
    assert svc.view().router == "up"
    svc.router, svc.router_closing = None, True
    assert svc.view().router == "closing" and not settled(svc.view())
    svc.router_closing = False
    assert svc.view().router == "none" and settled(svc.view())


def test_a_removed_service_is_removed_only_once_nothing_runs() -> None:
    """``removed``: an empty desired state, no router, no slot process."""
    svc = routed(Client(), None)
    assert not svc.removed
    svc.router = None
    assert svc.removed
    svc.desired = None
    assert not svc.removed


def test_close_asks_the_router_to_exit_waits_for_it_and_forgets_it(tmp_path: Path) -> None:
    """The router is asked to shut down, its process waited for; then its weights, pid and
    stats are forgotten and the manager woken."""
    proc = as_router(tmp_path, 0.3)
    client = Client()
    svc = routed(client, proc.pid)
    rl = link(tmp_path, svc)
    asyncio.run(rl.close(svc))
    assert proc.poll() is not None and client.shutdowns == 1
    assert (svc.router, svc.router_pid, svc.router_closing, svc.applied_weights) == (
        None, None, False, {})
    assert rl.wake.is_set()


def test_a_router_that_does_not_exit_after_draining_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Past its drain timeout and the grace, a router still running is killed (and said so)."""
    monkeypatch.setattr(routing, "CLOSE_GRACE", 0.1)
    proc = as_router(tmp_path, 60)
    svc = routed(Client(), proc.pid)
    started = time.monotonic()
    try:
        asyncio.run(link(tmp_path, svc).close(svc))
        assert time.monotonic() - started < 10 and not psutil.pid_exists(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert "did not exit after draining; killing it" in caplog.text
    assert svc.router_pid is None and not svc.router_closing


def test_a_router_already_gone_is_simply_forgotten(tmp_path: Path) -> None:
    """No process (a pid that ended) and no client: nothing to wait for, state reset."""
    svc = routed(None, None)
    asyncio.run(link(tmp_path, svc).close(svc))
    assert (svc.router_closing, svc.applied_weights) == (False, {})


def test_a_pid_that_is_no_longer_the_router_is_neither_waited_for_nor_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The router exited since it was adopted and its pid went to another process (or a
    listener named a process that never was the router): close leaves that process alone."""
    monkeypatch.setattr(routing, "CLOSE_GRACE", 0.1)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    svc = routed(Client(), other.pid)
    try:
        asyncio.run(link(tmp_path, svc).close(svc))
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    assert svc.router_pid is None and not svc.router_closing


def test_the_stats_loop_caps_each_routers_log(tmp_path: Path) -> None:
    """A router's log is capped as a slot's is, at each read of its counters: a router logs
    every request that meets a bug of its own with a traceback, and nothing else capped it."""
    from agent.host.slots import LOG_MAX_BYTES
    from protocol.messages import RouterStats

    class Reading(Client):
        async def stats(self) -> RouterStats:
            read.set()
            return RouterStats()

    read = asyncio.Event()
    svc = routed(Reading(), None)
    rl = link(tmp_path, svc)
    log_path = rl.log("hello")
    log_path.parent.mkdir(parents=True)
    with log_path.open("wb") as f:
        f.truncate(3 * LOG_MAX_BYTES)  # (sparse: no disk)
        f.seek(0, 2)
        f.write(b"Traceback: the last line\n")
    turns = 0

    async def next_read() -> None:
        nonlocal turns
        turns += 1
        if turns > 1:
            await asyncio.Event().wait()  # one pass is enough

    rl.next_read = next_read  # type: ignore[method-assign]

    async def one_pass() -> None:
        task = asyncio.create_task(rl.stats_loop())
        try:
            async with asyncio.timeout(10):
                await read.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(one_pass())
    assert log_path.stat().st_size == 0
    tail = log_path.with_name(log_path.name + ".1").read_bytes()
    assert tail.endswith(b"the last line\n") and len(tail) <= LOG_MAX_BYTES
