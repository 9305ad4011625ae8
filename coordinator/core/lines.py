"""Which per-node lines the coordinator logs one by one, and what it says of the rest.

A fleet of 50,000 coming online at once (a cold start, the broker's restart, agents reconnecting
after an outage) or going offline at once (a partition) is 50,000 transitions within seconds:
one log line each filled the coordinator's log with 50,000 lines (58,000 in a measured cold start
of 50,000 simulated nodes, ~10 % of its CPU during that storm) that no one reads one by one. The
events stream keeps every transition (``node.online``, ``node.offline``: ``fleetwave events``),
so the log can summarise a burst: of each kind, the first ``BURST`` in a window of ``WINDOW``
seconds are logged as they come, and the others are counted and said in one line when that
window closes (the daemon's ticker asks for them: ``due``). A fleet of ten nodes, where
transitions come one at a time, logs exactly what it did before. Registrations of nodes already
online (each agent re-registers when it reconnects: 50,000 after a broker's restart) are lines
of their own kind, ``node.registered``.

Pure: the time is given, so tests run in virtual time.
"""

from __future__ import annotations

from dataclasses import dataclass

BURST = 20  # lines of one kind logged one by one in a window
WINDOW = 5.0  # seconds

# What a summary says of the lines it stands for, by kind (one, several), and where they are
# kept in full. Every kind the daemon admits is here.
SAID = {
    "node.online": (("node came online", "nodes came online"),
                    "each is a node.online event ('fleetwave events')"),
    "node.offline": (("node went offline", "nodes went offline"),
                     "each is a node.offline event ('fleetwave events')"),
    "node.registered": (("online node registered again", "online nodes registered again"),
                        "'fleetwave nodes' lists them"),
}


@dataclass
class _Window:
    start: float
    logged: int = 0
    held: int = 0


class Lines:
    """Per kind, ``burst`` lines a ``window`` logged one by one; the others summed up."""

    def __init__(self, burst: int = BURST, window: float = WINDOW) -> None:
        if burst < 0 or not window > 0:
            raise ValueError(f"burst must be >= 0 and window > 0, not {burst!r}, {window!r}")
        self.burst = burst
        self.window = window
        self._windows: dict[str, _Window] = {}

    def admit(self, kind: str, now: float) -> bool:
        """Whether a line of ``kind`` is logged now; if not, it is counted for a summary. A
        window that has closed starts anew (its summary, if any, stays due until ``due``)."""
        w = self._windows.get(kind)
        if w is None or (now - w.start >= self.window and not w.held):
            w = self._windows[kind] = _Window(start=now)
        if w.logged < self.burst and now - w.start < self.window:
            w.logged += 1
            return True
        w.held += 1
        return False

    def due(self, now: float, *, every: bool = False) -> list[str]:
        """The summaries of the windows that have closed with lines held back, once each;
        ``every``: of the open ones too (the process stops)."""
        out = []
        for kind, w in list(self._windows.items()):
            if now - w.start < self.window and not every:
                continue
            if w.held:
                (one, several), kept = SAID.get(kind, ((f"{kind} line", f"{kind} lines"), ""))
                out.append(f"{w.held:,} more {one if w.held == 1 else several} in "
                           f"{now - w.start:.0f}s than the {w.logged} logged one by one"
                           + (f"; {kept}" if kept else ""))
            del self._windows[kind]
        return out
