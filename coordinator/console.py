"""``fleetwave``, the console script: ``coordinator.cli.main`` started and ended as a short-lived
command should be (pyproject's ``[project.scripts]``; scripts and tests that run the CLI through
``python -c`` call ``run`` too).

- **Its imports run with the cyclic collector off**, and what they made is then frozen
  (``gc.freeze``): nats-py, click, msgspec and ours make ~0.1 s of objects, none of them
  garbage, and the collections their allocations set off walked the same young objects again
  and again: 8 ms of every command's start (``deploy --help``: 127 against 134.5 ms, medians of
  12 in three alternated rounds). The collector is on again before the command runs (a
  followed rollout, a dev fleet and ``coordinator`` run for long).
- **It ends without the interpreter's teardown** once the command has returned and this thread
  is the only one: the exit handlers run, stdout and stderr are flushed, then ``os._exit``.
  Clearing every module and freeing its objects one by one took 10-25 ms of a followed
  deploy's exit (issue 17), with nothing left to write by then: every file the CLI writes is
  written whole and closed (atomic writes), and a command that left a thread running exits
  the interpreter's way, which waits for it.

Exit statuses are the interpreter's: ``SystemExit``'s code (None is 0; a string is
printed to stderr and is 1), and 120 when stdout or stderr cannot be flushed (a reader gone:
``| head``); a stream missing or closed is skipped.
A crash is not caught here: it gets the interpreter's traceback and exit.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from typing import NoReturn, TextIO


def run() -> NoReturn:
    """The ``fleetwave`` command (``sys.argv``)."""
    gc.disable()
    try:
        from coordinator.cli import main
    finally:
        gc.freeze()
        gc.enable()
    try:
        main()
    except SystemExit as exc:
        end(exc.code)
    end(0)


def end(code: str | int | None) -> NoReturn:
    """Exit with ``code`` (a ``SystemExit``'s): at once if nothing else runs, else as usual."""
    if threading.active_count() > 1:
        sys.exit(code)  # a thread to wait for: the interpreter's teardown joins it first
    status = exit_status(code)
    atexit._run_exitfuncs()
    out, err = flushed(sys.stdout), flushed(sys.stderr)  # both, whatever the first did
    if not (out and err):
        status = 120
    os._exit(status)


def flushed(stream: TextIO | None) -> bool:
    """Flush ``stream`` as the interpreter does at its exit: a missing one (its descriptor was
    closed when the process started: ``>&-``) or a closed one is skipped; False if the flush
    failed (the reader is gone)."""
    if stream is None or stream.closed:
        return True
    try:
        stream.flush()
    except (OSError, ValueError):
        return False
    return True


def exit_status(code: str | int | None) -> int:
    """The process's exit status for ``SystemExit(code)``, as the interpreter makes it (a code
    that is no number is said on stderr)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    if sys.stderr is not None:  # (print to None would write to stdout)
        with contextlib.suppress(OSError, ValueError):
            print(code, file=sys.stderr)
    return 1
