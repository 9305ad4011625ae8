"""The rollout history as kept beside the records in KV ``fw-<fleet>-rollouts``.

Keys (all start with ``_``: no rollout id can, ``subjects.check_name``):

    _index.<service>  ServiceIndex      the service's recent rollouts, newest first, one
                                         ``RolloutSummary`` each (what ``fleetwave rollouts``
                                         prints), bounded (``coordinator.core.history``)
    _latest           LatestRollout     the id of the rollout created last (``status`` alone)
    <rollout id>      RolloutRecord     a rollout kept whole, or, past the retention,
                      SummarisedRollout  the same key reduced to its summary and spec

A summarised value is told from a record by ``SummarisedRollout.summarised`` (``HistoryProbe``):
a record has no such field. Each value carries, like a record, the lease ``term`` of the leader
that wrote it. Wire Structs: new fields get defaults, types never change.
"""

from __future__ import annotations

import msgspec

from protocol.messages import RolloutSpec


class RolloutSummary(msgspec.Struct, kw_only=True):
    """One rollout in a few hundred bytes: a row of ``fleetwave rollouts``.

    ``whole``: its record is still kept whole (else reduced to a ``SummarisedRollout``);
    ``settled``: terminal and every event of its outbox acknowledged, so nothing of it is left to
    resume or publish again (the resync looks at the unsettled ones only).
    """

    id: str
    service: str
    version: str
    from_version: str = ""
    strategy: str = "rolling"
    state: str = "pending"
    reason: str = ""
    created: float = 0.0
    finished: float = 0.0
    nodes: int = 0
    waves: int = 0
    current_wave: int = 0
    started_by: str = ""
    whole: bool = True
    settled: bool = False


class ServiceIndex(msgspec.Struct, kw_only=True):
    """``_index.<service>``: the service's recent rollouts, newest first."""

    schema: int = 1
    service: str
    rollouts: list[RolloutSummary] = []
    term: int = 0


class LatestRollout(msgspec.Struct, kw_only=True):
    """``_latest``: the rollout created last in the fleet."""

    schema: int = 1
    id: str
    created: float = 0.0
    term: int = 0


class SummarisedRollout(msgspec.Struct, kw_only=True):
    """What is left of a rollout past the retention: its summary, and its spec (the settings a
    ``rollback`` to the version before it deploys with)."""

    summarised: bool = True
    summary: RolloutSummary
    spec: RolloutSpec
    term: int = 0


class HistoryProbe(msgspec.Struct):
    """Reads only whether a value of a rollout key is a ``SummarisedRollout``."""

    summarised: bool = False
