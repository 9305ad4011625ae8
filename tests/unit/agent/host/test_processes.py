"""agent.host.processes, the parts that need no process of their own: what a pid from a state
file may name, and what ending an empty group costs. Real processes are in
tests/integration/test_agent_slots*.py and test_agent_probes.py."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from agent.host import processes
from agent.host.processes import end_leftovers, group_alive, killpg, process_matches


@pytest.mark.parametrize("pid", [0, -1, -4242])
def test_a_pid_of_zero_or_less_matches_no_process(pid: int) -> None:
    """A pid of 0 or less (a damaged state file) is no process of ours, and says so without
    raising: psutil refuses a negative pid with ValueError, which took the agent down at every
    start."""
    assert process_matches(pid, psutil.Process().create_time()) is False


def test_a_pid_that_matches_is_the_very_process() -> None:
    """The live pid with its own create_time matches; another create_time does not."""
    me = psutil.Process()
    assert process_matches(me.pid, me.create_time())
    assert not process_matches(me.pid, me.create_time() + 5)


@pytest.mark.parametrize("pid", [0, -1])
def test_no_group_is_signalled_or_alive_for_a_pid_of_zero_or_less(
    pid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``killpg`` and ``group_alive`` never pass 0 or less to the kernel: 0 is the agent's own
    group, and -1 every process it may signal."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(processes.os, "killpg", lambda p, s: sent.append((p, s)))
    killpg(pid, signal.SIGTERM)
    assert not group_alive(pid)
    assert sent == []
    assert os.getpgid(0) > 0  # (this test's own group: untouched)


async def test_ending_the_leftovers_of_an_empty_group_costs_one_signal(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook or exec probe that left nothing in its group (the common case, and a probe runs
    every interval): ``end_leftovers`` sends one SIGTERM that finds no one, and neither scans
    the process table nor waits."""
    sent: list[tuple[int, int]] = []

    def no_group(pgid: int, sig: int) -> None:
        sent.append((pgid, sig))
        raise ProcessLookupError

    def scanned(*args: object, **kwargs: object) -> None:
        raise AssertionError("the process table was scanned")

    monkeypatch.setattr(processes.os, "killpg", no_group)
    monkeypatch.setattr(processes.psutil, "process_iter", scanned)
    await end_leftovers(4242)
    assert sent == [(4242, signal.SIGTERM)]
