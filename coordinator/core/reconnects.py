"""Whether many of the fleet's agents came back to the bus at once: a server of the cluster went
away, though this coordinator's own connection did not.

Theory of operation: an agent registers again after each reconnect of its own (``agent.daemon``:
within one heartbeat interval of it). When a server of a cluster dies, every agent connected to
it reconnects to another one, and every watch whose consumer it held starts again: an agent's
watch starts again within the fleet's restart spread (``protocol.bus.restart_spread``: 100 s at
50,000 nodes), during which a desired state written to it waits. The leader, on a live server,
sees no reconnect of its own (``Runner.excused_until`` covers that case), so a wave's progress
deadline could pass while those nodes were still starting their watches: a rollback for nothing.
What it does see is the burst of registrations. ``Reconnects`` counts the nodes that registered
over a sliding window (the agents' reconnect backoff plus a heartbeat interval, the time a burst
takes to be heard); ``LEAST`` of them, or ``SHARE`` of the fleet if more, make a burst. A node
counts once however often it registers (an agent in a crash loop, a flapping link: ten of them
registering every few seconds are ten nodes, not a burst). The runner excuses the fleet's
rollouts from the burst's end (``end``) as from a reconnect of its own. A burst is heard within
one window of its start, so it ends at its last registration or one window after its first,
whichever comes first: registrations that go on longer are churn, and an excuse renewed by each
of them would keep every progress deadline from passing for as long as it lasts (found by a
review: ten agents registering every 3.5 s had held a rollout for an hour). A lone agent's
reconnect is no burst: its node is judged as ever. A clock that steps back (an NTP step, a VM
restored) forgets what was counted: the times no longer compare. While a burst is
under way the leader's pace says so (``messages.Pace.burst``): agents that start at once (a
fleet-wide restart with the broker up, where no reconnect of theirs spreads them) wait for the
pace and start their first watch within the restart spread too, not 20,000 consumers at once.

Pure: the caller hands in the time, the fleet's size and the window.
"""

from __future__ import annotations

import math
from collections import OrderedDict

LEAST = 20  # nodes registering within the window that always make a burst, whatever the fleet
SHARE = 0.05  # ...or this share of the fleet, if more (a cluster of 3 losing one: about 1/3)
STEP_BACK = 1.0  # seconds the clock may seem to go back before what was counted is forgotten


class Reconnects:
    """The nodes that registered over a sliding window; ``last`` is the time of the latest
    registration that was part of a burst, ``began`` that burst's first (None: no burst heard),
    ``end`` what the burst's excuse runs from."""

    def __init__(self, least: int = LEAST, share: float = SHARE) -> None:
        if least < 1 or not 0 < share <= 1:
            raise ValueError(f"least must be >= 1 and share in (0, 1], not {least!r}, {share!r}")
        self.least = least
        self.share = share
        self.last: float | None = None
        self.began: float | None = None
        self.counted = 0  # nodes registered within the window at the last ``note``
        self.window = 0.0  # the window of the last ``note``
        # Each node's latest registration within the window, oldest first: at most the nodes
        # of the fleet, and only while they register (50,000 at once: 50,000 entries for one
        # window, then none).
        # An OrderedDict: its oldest entries are dropped at the front as the window slides,
        # which a dict does in time growing with what was dropped before (its iteration walks
        # the holes they leave), and a node that registers again moves to the end in one step.
        self._seen: OrderedDict[str, float] = OrderedDict()

    def note(self, now: float, fleet: int, window: float, node: str) -> bool:
        """``node`` registered at ``now``; True if it is part of a burst (``fleet`` nodes
        known, nodes counted over the last ``window`` seconds)."""
        self.window = window
        newest = next(reversed(self._seen.values()), None)
        if ((newest is not None and now < newest - STEP_BACK)
                or (self.last is not None and now < self.last - STEP_BACK)):
            self._seen.clear()  # the clock went back: nothing counted compares with now
            self.last = self.began = None
        self._seen[node] = now
        self._seen.move_to_end(node)
        # Oldest first, up to the first kept: each registration looks at what it drops and one
        # more, never at every node counted (a copy of them all at each one made 20,000
        # registrations at once cost the leader 11.8 s of CPU: session 34).
        gone = []
        for seen, at in self._seen.items():
            if at >= now - window:
                break
            gone.append(seen)
        for seen in gone:
            del self._seen[seen]
        self.counted = len(self._seen)
        if self.counted < max(self.least, math.ceil(self.share * fleet)):
            return False
        if self.last is None or now - self.last > window:
            self.began = now  # a new burst, not the tail of the last one
        self.last = now
        return True

    @property
    def end(self) -> float | None:
        """When the burst heard last ended, as its excuse counts it: its last registration, or
        one window after its first if it went on longer (churn, not a burst); None if none."""
        if self.last is None or self.began is None:
            return None
        return min(self.last, self.began + self.window)

    def under_way(self, now: float) -> bool:
        """Whether a burst is going on: it ended (``end``) within the window of ``now``."""
        end = self.end
        return end is not None and end - STEP_BACK <= now <= end + self.window
