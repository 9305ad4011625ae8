"""What a cohort rule did over a wave, for the gates' report (pure; issue 15).

The gates still judge the new slots against the old ones over the same window; under a cohort
rule that *is* the new cohort against the old one. This adds who they were:

- ``users_new`` / ``users_old``: approximate distinct users seen on each side at the wave's
  weight (a router starts its sketches afresh when its share changes: a step, or the first split
  once the new slot is healthy). Each router keeps a KMV sketch per slot (the ``SKETCH_K`` smallest
  64-bit key hashes; the hash is the rule's, salted by the rollout, so the same user hashes alike
  on every node); the sketches of all nodes merge by union, and ``protocol.cohort
  .estimate_users`` reads a count off the merged one (exact below ``SKETCH_K`` users, within
  about 9 % above). A user whose slot was unhealthy for a moment is counted on both sides.
- ``fallback_requests``: requests without the key in the window (decided by the fallback),
  ``assigned_cookies``, ``allowed`` and ``denied``: the same kind of window counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from protocol.cohort import estimate_users, merge_sketches
from protocol.messages import CohortTraffic, RouterStats

NodeWindow = tuple[RouterStats | None, RouterStats | None, str, str | None]
COUNTS = ("fallback", "assigned", "allowed", "denied")
NAMES = {"fallback": "fallback_requests", "assigned": "assigned_cookies",
         "allowed": "allowed", "denied": "denied"}


def _traffic(stats: RouterStats | None) -> CohortTraffic | None:
    return stats.cohort if stats is not None and isinstance(stats.cohort, CohortTraffic) else None


def cohort_figures(windows: Iterable[NodeWindow]) -> dict[str, Any]:
    """The cohort figures over ``(start, end, new slot, old slot)`` per node; {} when no router
    reported a cohort rule."""
    new: list[list[int]] = []
    old: list[list[int]] = []
    counts = dict.fromkeys(COUNTS, 0)
    seen = False
    for start, end, new_slot, old_slot in windows:
        last = _traffic(end)
        if last is None or end is None:
            continue
        seen = True
        new.append(last.users.get(new_slot, []))
        if old_slot is not None:
            old.append(last.users.get(old_slot, []))
        first = _traffic(start)
        same = first is not None and start is not None and start.epoch == end.epoch
        for name in COUNTS:
            before = getattr(first, name) if same and first is not None else 0
            counts[name] += max(0, getattr(last, name) - before)
    if not seen:
        return {}
    return {"users_new": estimate_users(merge_sketches(new)),
            "users_old": estimate_users(merge_sketches(old))} | {
        NAMES[k]: v for k, v in counts.items()}
