"""Whether many of the fleet's agents came back to the bus at once: a server of the cluster went
away, though this coordinator's own connection did not.

Theory of operation: an agent registers again after each reconnect of its own (``agent.daemon``:
within one heartbeat interval of it). When a server of a cluster dies, every agent connected to
it reconnects to another one, and every watch whose consumer it held starts again: an agent's
watch starts again within the fleet's restart spread (``protocol.bus.restart_spread``: 100 s at
50,000 nodes), during which a desired state written to it waits. The leader, on a live server,
sees no reconnect of its own (``Runner.excused_until`` covers that case), so a wave's progress
deadline could pass while those nodes were still starting their watches: a rollback for nothing.
What it does see is the burst of registrations. ``Reconnects`` counts the registrations it hears
over a sliding window (the agents' reconnect backoff plus a heartbeat interval, the time a burst
takes to be heard), in one-second buckets (a fleet of 50,000 registering at once is a few dozen
numbers, not 50,000); ``LEAST`` of them, or ``SHARE`` of the fleet if more, make a burst. The
runner excuses the fleet's rollouts from the last registration of a burst as from a reconnect of
its own. A lone agent's reconnect is no burst: its node is judged as ever. While a burst is
under way the leader's pace says so (``messages.Pace.burst``): agents that start at once (a
fleet-wide restart with the broker up, where no reconnect of theirs spreads them) wait for the
pace and start their first watch within the restart spread too, not 20,000 consumers at once.

Pure: the caller hands in the time, the fleet's size and the window.
"""

from __future__ import annotations

import math
from collections import deque

LEAST = 20  # registrations within the window that always make a burst, whatever the fleet
SHARE = 0.05  # ...or this share of the fleet, if more (a cluster of 3 losing one: about 1/3)


class Reconnects:
    """Registrations over a sliding window; ``last`` is the time of the latest one that was part
    of a burst, ``began`` that burst's first (None: no burst heard)."""

    def __init__(self, least: int = LEAST, share: float = SHARE) -> None:
        if least < 1 or not 0 < share <= 1:
            raise ValueError(f"least must be >= 1 and share in (0, 1], not {least!r}, {share!r}")
        self.least = least
        self.share = share
        self.last: float | None = None
        self.began: float | None = None
        self.counted = 0  # registrations in the window at the last ``note``
        self.window = 0.0  # the window of the last ``note``
        self._buckets: deque[list[int]] = deque()  # [second, count], oldest first
        self._total = 0

    def note(self, now: float, fleet: int, window: float) -> bool:
        """A node registered at ``now``; True if it is part of a burst (``fleet`` nodes known,
        registrations counted over the last ``window`` seconds)."""
        self.window = window
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([second, 1])
        self._total += 1
        while self._buckets and self._buckets[0][0] <= now - window - 1:
            self._total -= self._buckets.popleft()[1]
        self.counted = self._total
        if self._total < max(self.least, math.ceil(self.share * fleet)):
            return False
        if self.last is None or now - self.last > window:
            self.began = now  # a new burst, not the tail of the last one
        self.last = now
        return True

    def under_way(self, now: float) -> bool:
        """Whether a burst is going on: its last registration within the window of ``now``."""
        return self.last is not None and now - self.last <= self.window
