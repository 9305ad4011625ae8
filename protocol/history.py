"""The rollout history as kept beside the records in KV ``fw-<fleet>-rollouts``.

Keys (all start with ``_``: no rollout id can, ``subjects.check_name``):

    _index.<service>  ServiceIndex      the service's recent rollouts, newest first, one
                                         ``RolloutSummary`` each (what ``fleetwave rollouts``
                                         prints), bounded (``coordinator.core.history``)
    _latest           LatestRollout     the id of the rollout created last (``status`` alone)
    <rollout id>      RolloutRecord     a rollout kept whole, or, past the retention,
                      SummarisedRollout  the same key reduced to its summary and spec
    <rollout id>.<k>  RolloutPage       page k of a split record's node table (its head, the
                                         record under <rollout id>, says how many:
                                         ``coordinator.core.pages``); purged with its head's
                                         reduction; compressed (``pack_page``)

A summarised value is told from a record by ``SummarisedRollout.summarised`` (``HistoryProbe``):
a record has no such field. Each value carries, like a record, the lease ``term`` of the leader
that wrote it. Wire Structs: new fields get defaults, types never change.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import msgspec
from msgspec import UNSET

from protocol.errors import ProtocolError
from protocol.messages import Event, NodeProgress, RolloutRecord, RolloutSpec, RouterStats

# A page as stored: its JSON, deflated (zlib, level 1). A page is hundreds of nodes' progress,
# each with two desired states that differ from their neighbours' in a name, a generation and
# a time: 10-25x smaller deflated, at ~700 MB/s. The record's writes were twice the bytes of
# the desired states they decide (5 MB a wave at 10,000 nodes), every one stored and fsynced.
# A page stored before (plain JSON, which starts with "{") is read as it is.
PAGE_LEVEL = 1
PAGE_MAX_BYTES = 64 * 2**20  # what a page may inflate to: more is a hostile value, refused


def pack_page(data: bytes) -> bytes:
    """A page's JSON as stored (``unpack_page`` reads it back)."""
    return zlib.compress(data, PAGE_LEVEL)


def unpack_page(value: bytes) -> bytes:
    """A stored page's JSON: inflated, or as it is when it was stored plain (before pages were
    deflated). ProtocolError for a value that is neither, or inflates past PAGE_MAX_BYTES."""
    if value[:1] == b"{":
        return value
    if not value:
        raise ProtocolError("not a page: empty")
    inflate = zlib.decompressobj()
    try:
        data = inflate.decompress(value, PAGE_MAX_BYTES)
    except zlib.error as exc:
        raise ProtocolError(f"not a page: {exc}") from None
    if inflate.unconsumed_tail:
        raise ProtocolError(f"not a page: it inflates past {PAGE_MAX_BYTES // 2**20} MiB")
    if not inflate.eof:
        raise ProtocolError("not a page: it is cut short")
    if inflate.unused_data:
        raise ProtocolError("not a page: bytes follow its end")
    return data


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


class RolloutPage(msgspec.Struct, kw_only=True):
    """``<rollout id>.<index>``: one page of a split record's node table (``coordinator.core.
    pages``): the progress of its nodes, where each stands in the waves' member lists, and the
    router snapshots of the waves' baselines (and ``evidence_from``) that belong to its nodes,
    and the events about its nodes still in the record's outbox (``RolloutRecord.outbox``: a wave
    of thousands of nodes decides thousands at once, more than the head could hold)."""

    schema: int = 1
    rollout: str
    index: int
    nodes: dict[str, NodeProgress] = {}
    waves: dict[int, dict[str, int]] = {}  # wave (list position) -> {node: position in it}
    baseline: dict[int, dict[str, RouterStats]] = {}
    evidence: dict[int, dict[str, RouterStats]] = {}
    term: int = 0
    outbox: list[Event] = []


class NodeSeen(msgspec.Struct, kw_only=True):
    """A node's progress as ``status`` shows it: a ``NodeProgress`` read without its desired
    states (``previous``, ``target``), which are most of a page's bytes and objects."""

    node: str
    wave: int = -1
    state: str = "waiting"
    reason: str = ""
    healthy: bool = False
    version: str = ""
    generation: int = 0
    slot: str = ""
    online: bool = True
    staged: str = ""


class PageSeen(msgspec.Struct, kw_only=True):
    """A ``RolloutPage`` as ``status`` reads it: its nodes (``NodeSeen``) and their places in
    the waves; no router snapshots, no outbox."""

    rollout: str
    index: int
    nodes: dict[str, NodeSeen] = {}
    waves: dict[int, dict[str, int]] = {}

    def page(self) -> RolloutPage:
        """As a ``RolloutPage`` whose nodes have no desired states: for showing, never for
        driving a rollout."""
        return RolloutPage(rollout=self.rollout, index=self.index, waves=self.waves, nodes={
            n: NodeProgress(**msgspec.structs.asdict(p)) for n, p in self.nodes.items()})


def assemble(top: RolloutRecord, pages: Iterable[RolloutPage]) -> RolloutRecord:
    """The whole record from its head and its pages, in any order (``coordinator.core.pages.
    layout_of`` checks that none is missing)."""
    ordered = sorted(pages, key=lambda p: p.index)
    nodes = {n: p for pg in ordered for n, p in pg.nodes.items()}
    waves = []
    for w, wave in enumerate(top.waves):
        members = sorted((at, n) for pg in ordered for n, at in pg.waves.get(w, {}).items())
        baseline: dict[str, RouterStats] = {}
        evidence: dict[str, RouterStats] = {}
        for pg in ordered:
            baseline.update(pg.baseline.get(w, {}))
            evidence.update(pg.evidence.get(w, {}))
        waves.append(msgspec.structs.replace(
            wave, nodes=[n for _, n in members], baseline=baseline,
            evidence_from=UNSET if wave.evidence_from is UNSET else evidence))
    outbox = [*top.outbox, *(e for pg in ordered for e in pg.outbox)]
    outbox.sort(key=lambda e: e.time)  # stable: the order they were decided in
    return msgspec.structs.replace(top, nodes=nodes, waves=waves, pages=0, node_count=0,
                                   outbox=outbox)
