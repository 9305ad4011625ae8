"""``fleetwave``'s console script (``coordinator.console``): it ends without the interpreter's
teardown, and loses nothing by it: exit statuses, exit handlers, whatever is still buffered
for stdout, and a thread left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.console import exit_status

# ``fleetwave ARGS`` as the console script runs it, after ``SETUP`` (Python statements).
SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
OUT = Path(sys.argv.pop(1))
{setup}
from coordinator.console import run
run()
"""


def fleetwave(tmp_path: Path, *args: str, setup: str = "",
              buffered: bool = False) -> subprocess.CompletedProcess[bytes]:
    """``buffered``: stdout is, whatever PYTHONUNBUFFERED says here."""
    env = {k: v for k, v in os.environ.items() if not (buffered and k == "PYTHONUNBUFFERED")}
    return subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup), str(tmp_path),
                           *args], capture_output=True, timeout=60, check=False, env=env)


def test_exit_statuses_and_the_output_are_the_commands(tmp_path: Path) -> None:
    """0 and the whole help; 2 and one line for a bad flag (``main``'s statuses, unchanged)."""
    ok = fleetwave(tmp_path, "deploy", "--help")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(b"Usage: fleetwave deploy") and b"-h, --help" in ok.stdout
    bad = fleetwave(tmp_path, "deploy", "--bogus")
    assert bad.returncode == 2
    assert bad.stderr.decode().splitlines() == [
        "fleetwave: No such option '--bogus'. (see 'fleetwave deploy --help')"]


def test_exit_handlers_run_and_what_they_print_is_flushed(tmp_path: Path) -> None:
    """A handler registered by the command runs, and 1 MB it prints (past any pipe buffer)
    reaches the reader whole: os._exit comes after both."""
    setup = ("atexit.register(lambda: (OUT.joinpath('ran').write_text('yes'), "
             "print('x' * (1 << 20), end='END')))")
    done = fleetwave(tmp_path, "--help", setup=setup, buffered=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ran").read_text() == "yes"
    assert done.stdout.endswith(b"x" * (1 << 20) + b"END")


def test_the_interpreters_teardown_is_skipped(tmp_path: Path) -> None:
    """What only the teardown does (its full collection: gc's callbacks hear it, armed by the
    last exit handler to run) is not done: the process ends at os._exit, after the handlers
    and the flush."""
    setup = ("def arm():\n"
             "    path, write = str(OUT / 'collected'), open\n"
             "    def heard(phase, info):\n"
             "        if info['generation'] == 2:\n"
             "            with write(path, 'a') as f:\n"
             "                f.write(phase)\n"
             "    import gc\n"
             "    gc.callbacks.append(heard)\n"
             "atexit.register(arm)")  # registered first: run last
    done = fleetwave(tmp_path, "--help", setup=setup)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "collected").exists()


@pytest.mark.parametrize("fd", [1, 2])
def test_a_stream_closed_from_the_start_is_skipped(tmp_path: Path, fd: int) -> None:
    """``fleetwave ... >&-`` (or ``2>&-``): no stdout (stderr) at all is skipped at the end, as
    the interpreter skips it; the status is the command's (0 for --help, 2 for a bad flag)."""
    for args, status in ((["--help"], 0), (["deploy", "--bogus"], 2)):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT.format(setup=""), str(tmp_path), *args],
            stdin=subprocess.DEVNULL, capture_output=False, timeout=60, check=False,
            stdout=subprocess.DEVNULL if fd == 2 else None,
            stderr=subprocess.DEVNULL if fd == 1 else None,
            close_fds=True, preexec_fn=lambda: os.close(fd))
        assert done.returncode == status, (args, done.returncode)


def test_a_thread_left_running_is_waited_for(tmp_path: Path) -> None:
    """A command that leaves a (non-daemon) thread running exits the interpreter's way, which
    waits for the thread: it finishes its work."""
    setup = ("threading.Thread(target=lambda: (time.sleep(0.5), "
             "OUT.joinpath('thread').write_text('done'))).start()")
    done = fleetwave(tmp_path, "deploy", "--bogus", setup=setup)
    assert done.returncode == 2
    assert (tmp_path / "thread").read_text() == "done"


def test_a_reader_gone_is_exit_status_120(tmp_path: Path) -> None:
    """stdout that cannot be flushed at the end (its reader closed the pipe) is status 120,
    as the interpreter makes it. (Buffered: PYTHONUNBUFFERED would write it at once.)"""
    setup = "atexit.register(lambda: sys.stdout.write('x' * 100))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(setup=setup), str(tmp_path),
                             "deploy", "--bogus"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.wait(timeout=60) == 120


@pytest.mark.parametrize(("code", "status", "said"), [
    (None, 0, ""), (0, 0, ""), (3, 3, ""), (256, 0, ""), (-1, 255, ""), ("no way", 1, "no way\n"),
])
def test_exit_status_is_the_interpreters(code: str | int | None, status: int, said: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(code) == status
    assert capsys.readouterr().err == said


def test_a_message_without_stderr_is_said_nowhere(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``2>&-`` (no sys.stderr): a string code is 1 and is not printed to stdout instead."""
    monkeypatch.setattr(sys, "stderr", None)
    assert exit_status("no way") == 1
    assert capsys.readouterr().out == ""
