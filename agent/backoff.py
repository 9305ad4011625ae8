"""Restart back-off and budget: one pure policy for crash restarts and for self-healing.

A restart waits ``first * 2**n`` seconds (capped at ``cap``), ``n`` being the restarts already
made within the last ``window`` seconds; once ``max_restarts`` were made within the window the
budget is spent (``delay`` says None) and the caller reports a loop instead of restarting. Pure:
the caller keeps the restart times and passes the clock, so the reconciler and tests use it as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    max_restarts: int
    window: float
    first: float
    cap: float

    def recent(self, times: Iterable[float], now: float) -> list[float]:
        """The restart times still inside the window at ``now``."""
        return [t for t in times if now - t < self.window]

    def delay(self, made: int) -> float | None:
        """Seconds before the next restart after ``made`` recent ones; None: budget spent."""
        if made >= self.max_restarts:
            return None
        return float(min(self.cap, self.first * 2**made))
