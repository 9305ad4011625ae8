"""The rollout history: summaries, the per-service index, and which records retention reduces.

Theory of operation: every rollout has a *summary* (``RolloutSummary``: what ``fleetwave
rollouts`` prints). Each service has an *index*, its recent summaries newest first, kept in one
KV key and rewritten in the same atomic write as the record whenever the record's summary
changes (created, started, a wave, paused, terminal, its last events acknowledged). Reading the
history is reading indexes: the cost of ``rollouts``, ``status`` and ``rollback`` does not grow
with the number of rollouts ever made.

Retention (``retain``), per service, newest first by (created, id):

- the newest ``keep`` rollouts stay whole;
- older ones are *reduced*: their record is replaced by its summary and spec, once they are
  *settled* (terminal, every event acknowledged: nothing left to resume or publish); a rollout
  that is not settled is never reduced, whatever its age;
- the index holds at most ``cap`` summaries (``max(keep, LIST_MIN)``) and past that drops the
  oldest settled, reduced ones (their reduced value stays under their id: ``status ID`` finds
  it); it never drops one still whole or unsettled, which the resync or retention still need.

Everything here is pure; ``coordinator.runtime.store`` reads and writes it.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from protocol.durations import parse_duration
from protocol.errors import ProtocolError
from protocol.history import RolloutSummary
from protocol.messages import TERMINAL_STATES, RolloutRecord

KEEP_DEFAULT = 50  # rollouts per service kept whole (README: why)
KEEP_MAX = 1000  # an index of this many summaries stays well under a 1 MiB message
LIST_MIN = 100  # summaries an index holds at least, whatever ``keep``: what ``rollouts`` lists


@dataclass(frozen=True)
class Retention:
    """How much of each service's history is kept whole (``keep``) and listed (``cap``)."""

    keep: int = KEEP_DEFAULT

    def __post_init__(self) -> None:
        if not 0 <= self.keep <= KEEP_MAX:
            raise ValueError(f"keep must be 0-{KEEP_MAX}, not {self.keep}")

    @property
    def cap(self) -> int:
        return max(self.keep, LIST_MIN)


# The events stream's limits (``fleetwave coordinator --events-max-age/--events-max-bytes``):
# at least an hour and 16 MiB (four of the largest events: a smaller budget would drop a big
# wave's events as soon as they are stored), at most ten years and 1 PiB.
EVENTS_AGE_MIN, EVENTS_AGE_MAX = 3600.0, 3650 * 86400.0
EVENTS_BYTES_MIN, EVENTS_BYTES_MAX = 16 * 2**20, 2**50
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?$", re.IGNORECASE)
_AGE = re.compile(r"^(\d+(?:\.\d+)?)d\Z")


def parse_size(text: str, *, what: str) -> int:
    """Bytes in ``text``: a number with an optional unit, ``500MB`` (10^6), ``8GiB`` (2^30),
    ``8G`` (as GiB); ValueError saying what to write."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise ValueError(f"{what}: {text!r} is not a size; write bytes with a unit, e.g. "
                         "'512MiB', '8GiB' or '2TB'")
    unit = (m[2] or "B").upper()
    power = "BKMGTP".index(unit[0])
    base = 1000 if unit.endswith("B") and not unit.endswith("IB") and unit != "B" else 1024
    size = int(float(m[1]) * base**power)
    if not EVENTS_BYTES_MIN <= size <= EVENTS_BYTES_MAX:
        raise ValueError(f"{what}: {text!r} is outside 16MiB-1PiB; a smaller budget would drop "
                         "a big wave's events as soon as they are stored")
    return size


def parse_age(text: str, *, what: str) -> float:
    """Seconds in ``text``: a duration (``12h``, ``30m``, ``1h30m``) or days (``90d``);
    ValueError saying what to write."""
    m = _AGE.match(text.strip())
    try:
        seconds = float(m[1]) * 86400 if m else parse_duration(text, what=what)
    except ProtocolError as exc:
        raise ValueError(f"{exc} (or days: '90d')") from None
    if not EVENTS_AGE_MIN <= seconds <= EVENTS_AGE_MAX:
        raise ValueError(f"{what}: {text!r} is outside 1h-3650d")
    return seconds


@dataclass(frozen=True)
class Retained:
    """An index after retention: its summaries, and those whose records are to be reduced now
    (already marked ``whole=False`` in ``entries``)."""

    entries: list[RolloutSummary]
    reduce: list[RolloutSummary] = field(default_factory=list)


def summarise(record: RolloutRecord) -> RolloutSummary:
    """The summary of a record as persisted (its outbox says whether it is settled)."""
    return RolloutSummary(
        id=record.id, service=record.spec.service, version=record.release.version,
        from_version=record.from_version, strategy=record.spec.strategy, state=record.state,
        reason=record.reason, created=record.created, finished=record.finished,
        nodes=len(record.nodes) or record.node_count, waves=len(record.waves),
        current_wave=record.current_wave,
        started_by=record.started_by,
        settled=record.state in TERMINAL_STATES and not record.outbox,
    )


def row(s: RolloutSummary) -> dict[str, Any]:
    """One row of ``fleetwave rollouts`` (the API's ``rollouts`` answer), from a summary."""
    return {
        "id": s.id, "service": s.service, "version": s.version,
        "from_version": s.from_version, "strategy": s.strategy, "state": s.state,
        "reason": s.reason, "created": s.created, "finished": s.finished,
        "nodes": s.nodes, "waves": s.waves, "current_wave": s.current_wave,
        "started_by": s.started_by,
    }


def _newest_first(entries: Iterable[RolloutSummary]) -> list[RolloutSummary]:
    return sorted(entries, key=lambda s: (s.created, s.id), reverse=True)


def same(a: RolloutSummary, b: RolloutSummary) -> bool:
    """Whether two summaries of one rollout say the same (``whole`` aside: the index's own)."""
    return msgspec.structs.replace(a, whole=b.whole) == b


def with_summary(entries: Sequence[RolloutSummary], summary: RolloutSummary,
                 retention: Retention) -> Retained:
    """``entries`` with ``summary`` put in (replacing the one of the same id, keeping whether
    its record is whole), then retained."""
    old = next((e for e in entries if e.id == summary.id), None)
    if old is not None:
        summary = msgspec.structs.replace(summary, whole=old.whole)
    rest = [e for e in entries if e.id != summary.id]
    return retain([summary, *rest], retention)


def without(entries: Sequence[RolloutSummary], rollout_id: str) -> list[RolloutSummary]:
    """``entries`` without the rollout ``rollout_id`` (a record discarded before it started)."""
    return [e for e in entries if e.id != rollout_id]


def retain(entries: Iterable[RolloutSummary], retention: Retention) -> Retained:
    """Apply the retention (module docstring) to one service's summaries."""
    out: list[RolloutSummary] = []
    reduce: list[RolloutSummary] = []
    for i, entry in enumerate(_newest_first(entries)):
        if i >= retention.keep and entry.whole and entry.settled:
            entry = msgspec.structs.replace(entry, whole=False)
            reduce.append(entry)
        if i >= retention.cap and entry.settled and not entry.whole:
            continue  # past the list, reduced already: its own key keeps what is left
        out.append(entry)
    return Retained(out, reduce)


def rebuild(summaries: Iterable[RolloutSummary],
            retention: Retention) -> dict[str, Retained]:
    """Every service's index from the summaries of every record found (a fleet written before
    there were indexes), retained."""
    by_service: dict[str, list[RolloutSummary]] = {}
    for s in summaries:
        by_service.setdefault(s.service, []).append(s)
    return {service: retain(group, retention) for service, group in by_service.items()}


def newest(indexes: Iterable[Sequence[RolloutSummary]], limit: int) -> list[RolloutSummary]:
    """The ``limit`` newest summaries of several services' indexes (each newest first)."""
    key = lambda s: (s.created, s.id)  # noqa: E731  # one key for merge and order
    merged = heapq.merge(*indexes, key=key, reverse=True)
    return [s for _, s in zip(range(limit), merged, strict=False)]


@dataclass(frozen=True)
class RollbackChoice:
    """What ``rollback SERVICE`` deploys without a live rollout: ``version``, with the settings
    of rollout ``base``; ``running`` names a rollout that is not terminal (nothing is chosen)."""

    version: str = ""
    base: str = ""
    running: RolloutSummary | None = None


def rollback_choice(entries: Sequence[RolloutSummary], to_version: str = "", *,
                    removal: Callable[[str], bool] = lambda _strategy: False) -> RollbackChoice:
    """The version before the service's last successful rollout (or ``to_version``), and the
    rollout whose settings to reuse: that one, else the latest (``entries`` newest first). A
    latest rollout whose strategy is a ``removal`` and that was not rolled back counts as that
    success, whatever came before it: rollback undoes the removal (even a part-way one)."""
    running = next((e for e in entries if e.state not in TERMINAL_STATES), None)
    if running is not None:
        return RollbackChoice(running=running)
    last_good = next((e for e in entries if e.state == "succeeded"), None)
    if entries and removal(entries[0].strategy) and entries[0].state != "rolled_back":
        last_good = entries[0]
    version = to_version or (last_good.from_version if last_good else "")
    base = last_good or (entries[0] if entries else None)
    return RollbackChoice(version=version, base=base.id if base else "")
