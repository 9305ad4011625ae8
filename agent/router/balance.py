"""Which slot serves the next request: smooth weighted round-robin, pure and deterministic.

This is nginx's algorithm: every pick adds each candidate's weight to its running score, takes
the highest score, and subtracts the total from the winner. Over any ``sum(weights)`` consecutive
picks each candidate is chosen exactly ``weight`` times, and the picks are interleaved rather than
bunched (weights 3:1 give a a b a, not a a a b), so a test can check the split exactly.

Only candidates the router may serve users from are given here: healthy, weight > 0, and not the
mirror target. An empty balancer picks None (the router answers 503).
"""

from __future__ import annotations

from collections.abc import Sequence


class SmoothWeighted:
    """Smooth weighted round-robin over ``(name, weight)`` candidates with positive weights."""

    __slots__ = ("_current", "_names", "_total", "_weights")

    def __init__(self, candidates: Sequence[tuple[str, int]]) -> None:
        kept = [(n, w) for n, w in candidates if w > 0]
        self._names = [n for n, _ in kept]
        self._weights = [w for _, w in kept]
        self._current = [0] * len(kept)
        self._total = sum(self._weights)

    @property
    def names(self) -> list[str]:
        """The candidates, heaviest first (the order fallbacks are tried in)."""
        order = sorted(range(len(self._names)), key=lambda i: -self._weights[i])
        return [self._names[i] for i in order]

    def pick(self) -> str | None:
        """The next candidate, or None if there is none."""
        n = len(self._names)
        if n == 0:
            return None
        if n == 1:
            return self._names[0]
        best = 0
        current = self._current
        weights = self._weights
        for i in range(n):
            current[i] += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return self._names[best]

    def others(self, name: str) -> list[str]:
        """The candidates other than ``name``, heaviest first: where to retry after a failure."""
        return [n for n in self.names if n != name]
