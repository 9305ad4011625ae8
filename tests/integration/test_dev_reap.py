"""``reap_leftovers`` (what a dev fleet or a bench run leaves is stopped): a process that starts
another as it is stopped (an agent that started a new router as it got SIGTERM with the old
one) does not leave that one running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from coordinator.dev.devfleet import reap_leftovers
from tests.integration.procs import ended

# Under SIGTERM, start a successor working in the same directory (its pid written down), then
# exit; say "up" once the trap is set.
RESPAWNS = """
import os, signal, subprocess, sys, time
def stop(*_):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
    open("successor", "w").write(str(child.pid))
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
print("up", flush=True)
time.sleep(60)
"""


def test_a_process_started_while_the_leftovers_stop_is_stopped_too(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", RESPAWNS], cwd=tmp_path,
                            stdout=subprocess.PIPE, start_new_session=True)
    successor: int | None = None
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert reap_leftovers(tmp_path, exclude=set()) == 2
        assert proc.wait(timeout=10) == 0
        successor = int((tmp_path / "successor").read_text())
        gone = not psutil.pid_exists(successor) or (
            psutil.Process(successor).status() == psutil.STATUS_ZOMBIE)
        assert gone, "the successor started during the reap still runs"
    finally:
        ended(proc)
        if successor is not None and psutil.pid_exists(successor):
            psutil.Process(successor).kill()
