"""A slot's process as the agent's child: started, reaped, and never killed for being left.

A slot's process must outlive the agent: ``systemctl restart fleetwave-agent`` (an upgrade, a
crash, ``kill -9``) must stop no service; the restarted agent adopts what runs
(``SlotRunner.adopt``). asyncio's subprocess transport kills a child that still runs when the
transport is closed or collected (``BaseSubprocessTransport.__del__``). On Python 3.11 the
agent's transports were never collected before its process ended; on Python 3.13 they are, as
the interpreter finalizes, and every slot died with the agent's exit: found by the test suite
run on 3.13 (``test_agent_hostile_state``, ``test_rotation``: "a service process was
restarted"). So a slot's process is a ``subprocess.Popen`` (whose collection only warns), and
its exit is heard through a pidfd on the event loop (``os.pidfd_open``, Linux 5.3+), or polled
where there is none. The agent stays its parent: it reaps the exit and reads its status at
once, as before.

Hooks and exec probes are short-lived and always waited for (``probes.spawn_owned``); the
routers double-fork away from the agent (``router.control.start_router``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from typing import Any

POLL = 0.2  # without a pidfd: how often the exit is looked for


class Child:
    """A running process started by ``start``; ``wait`` for its exit status."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # no pidfd here: ``wait`` polls
            return
        try:
            self._loop.add_reader(self._pidfd, self._check)
        except (NotImplementedError, OSError, ValueError):  # a loop without readers: poll
            os.close(self._pidfd)
            self._pidfd = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def _check(self) -> None:
        if self._popen.poll() is None:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._exited.set()

    async def wait(self) -> int:
        """The exit status, once the process has exited (it is reaped then)."""
        while self._popen.returncode is None:
            if self._pidfd is None:
                self._check()
                if self._popen.returncode is None:
                    await asyncio.sleep(POLL)  # (no pidfd: the exit cannot wake us)
                continue
            await self._exited.wait()
        self._check()  # (the pidfd closed, should the exit have been found by another wait)
        return self._popen.returncode

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.send_signal(sig)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()


def start(argv: list[str], **kw: Any) -> Child:
    """Start ``argv`` with ``subprocess.Popen``'s arguments ``kw`` (OSError if it cannot)."""
    return Child(subprocess.Popen(argv, **kw))
