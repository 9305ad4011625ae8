"""The record split: a rollout record as a small head plus pages of its node table.

Why: the node table (each node's previous and target desired states) and the waves' router
baselines grow with the fleet: ~2 KB a node, 4-5 MB at 5,000 nodes, so one KV value hit the
server's ``max_payload`` (1 MB by default) at ~700 nodes, and every engine step re-encoded and
re-wrote all of it: O(fleet) bytes per step, O(fleet x steps) per rollout.

The layout: the record's nodes in the order the waves take them (wave 0's, then wave 1's new
ones, ..., then any in no wave: ``order``), cut into pages of at most ``PAGE_BYTES`` of their
worst-case size (``plan``). A page holds its nodes' ``NodeProgress``, their positions in each
wave's member list, and their router snapshots in each wave's ``baseline`` and
``evidence_from``. The head is the record with all of those emptied (``pages`` and
``node_count`` say what is missing). Pages follow the waves, so a wave's step rewrites the pages
of that wave's nodes and the head, not the fleet: O(changed nodes) bytes (``dirty``). Per node
keys would be as small, but a 50,000-node rollout would then be 50,000 keys to write, read back
on resume and purge on reduction; per wave keys do not fit: a 10 % wave of 50,000 nodes is ~10 MB.

A node keeps its page for the rollout's life (the layout is derived back from the pages on
load: ``layout_of``), so a node joining a wave later, or a wave reordered, rewrites only the
pages concerned. Everything here is pure; ``coordinator.runtime.store`` reads and writes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
from msgspec import UNSET

from coordinator.errors import UsageError
from protocol.history import RolloutPage, assemble
from protocol.messages import Event, RolloutRecord, RouterStats, WaveRecord

__all__ = ["HEAD", "MAX_PAGES", "PAGE_BYTES", "Layout", "assemble", "dirty", "fit", "head",
           "layout_of", "mail", "order", "page", "place", "plan", "positions", "split"]

PAGE_BYTES = 256 * 1024  # worst-case bytes of one page: a step rewrites whole pages
MAX_PAGES = 400  # pages of one rollout: with its head and history, one atomic batch (< 500)


@dataclass
class Layout:
    """Which page holds each node: ``pages[k]`` are page k's nodes, in the record's order."""

    pages: list[list[str]]
    page_of: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.page_of:
            self.page_of = {n: k for k, nodes in enumerate(self.pages) for n in nodes}


def order(record: RolloutRecord) -> list[str]:
    """The record's nodes as the waves take them, then any in no wave (the table's order)."""
    seen: dict[str, None] = {}
    for wave in record.waves:
        for node in wave.nodes:
            if node in record.nodes:
                seen.setdefault(node, None)
    for node in record.nodes:
        seen.setdefault(node, None)
    return list(seen)


def plan(nodes: Iterable[str], size: Callable[[str], int], budget: int = PAGE_BYTES) -> Layout:
    """Cut ``nodes`` (in order) into pages whose nodes' ``size`` adds up to at most ``budget``
    (a node bigger than that alone gets a page of its own: the caller refuses it beforehand)."""
    pages: list[list[str]] = []
    used = budget + 1
    for node in nodes:
        cost = size(node)
        if used + cost > budget:
            pages.append([])
            used = 0
        pages[-1].append(node)
        used += cost
    return Layout(pages)


def place(record: RolloutRecord, layout: Layout) -> Layout:
    """``layout`` with the record's nodes that have no page yet on one new page (rare: a node
    table only ever holds the nodes planned at deploy); the same object when there are none."""
    new = [n for n in record.nodes if n not in layout.page_of] if (
        len(record.nodes) != len(layout.page_of)) else []
    if not new:
        return layout
    return Layout([*layout.pages, new])


def positions(waves: list[WaveRecord]) -> list[dict[str, int]]:
    """Per wave, each member's position in its list."""
    return [{n: i for i, n in enumerate(w.nodes)} for w in waves]


def head(record: RolloutRecord, layout: Layout) -> RolloutRecord:
    """The record without what its pages hold (its events about a node among them)."""
    return msgspec.structs.replace(
        record, nodes={}, pages=len(layout.pages), node_count=len(record.nodes),
        outbox=mail(record, layout).get(HEAD, []),
        waves=[msgspec.structs.replace(
            w, nodes=[], baseline={},
            evidence_from=UNSET if w.evidence_from is UNSET else {}) for w in record.waves])


HEAD = -1  # ``mail``'s key for the events the head keeps: the rollout's own, not a node's


def mail(record: RolloutRecord, layout: Layout) -> dict[int, list[Event]]:
    """The record's outbox by where it is kept: an event about a node on the node's page, any
    other in the head (``HEAD``), each list in the outbox's order."""
    out: dict[int, list[Event]] = {}
    for event in record.outbox:
        out.setdefault(layout.page_of.get(event.node, HEAD), []).append(event)
    return out


def page(record: RolloutRecord, layout: Layout, index: int,
         where: list[dict[str, int]] | None = None,
         posts: dict[int, list[Event]] | None = None) -> RolloutPage:
    """Page ``index`` of ``record`` (``where``: ``positions(record.waves)``, and ``posts``:
    ``mail(record, layout)``, if known)."""
    where = positions(record.waves) if where is None else where
    posts = mail(record, layout) if posts is None else posts
    mine = [n for n in layout.pages[index] if n in record.nodes]
    out = RolloutPage(rollout=record.id, index=index, term=record.term,
                      nodes={n: record.nodes[n] for n in mine}, outbox=posts.get(index, []))
    for w, (wave, at) in enumerate(zip(record.waves, where, strict=True)):
        members = {n: at[n] for n in mine if n in at}
        if members:
            out.waves[w] = members
        # (Most waves keep no snapshot: only the running one and the one before it.)
        if wave.baseline and (base := {
                n: s for n in mine if (s := wave.baseline.get(n)) is not None}):
            out.baseline[w] = base
        if wave.evidence_from and (ev := {
                n: s for n in mine if (s := wave.evidence_from.get(n)) is not None}):
            out.evidence[w] = ev
    return out


def split(record: RolloutRecord, layout: Layout) -> tuple[RolloutRecord, list[RolloutPage]]:
    """The head and every page of ``record``."""
    where, posts = positions(record.waves), mail(record, layout)
    return head(record, layout), [page(record, layout, k, where, posts)
                                  for k in range(len(layout.pages))]


def layout_of(top: RolloutRecord, pages: Iterable[RolloutPage]) -> Layout:
    """The layout a head's pages were written with; ValueError if one is missing."""
    by_index = {p.index: p for p in pages}
    missing = [k for k in range(top.pages) if k not in by_index]
    if missing:
        raise ValueError(f"{len(missing)} of its {top.pages} pages are missing "
                         f"(first: {top.id}.{missing[0]})")
    return Layout([list(by_index[k].nodes) for k in range(top.pages)])


def dirty(old: RolloutRecord, new: RolloutRecord, layout: Layout,
          touched: Collection[str] | None = None) -> set[int]:
    """The pages whose content differs between ``old`` and ``new`` (``layout`` holds every node
    of both). What a step shares with the record before it (desired states, router snapshots)
    compares by identity, so an unchanged node costs a pointer check, and an unchanged wave
    list one C-speed list comparison. ``touched``: the only nodes whose progress may differ
    (the engine's steps took no other since ``old``: ``Rollout.touched``), so that a persist
    costs O(those) rather than a Python loop over every node (9 ms at 50,000 nodes)."""
    page_of = layout.page_of
    out: set[int] = set()
    if old.outbox != new.outbox:  # events compare by identity first: kept ones cost nothing
        before, after = mail(old, layout), mail(new, layout)
        out.update(k for k in before.keys() | after.keys()
                   if k != HEAD and before.get(k) != after.get(k))
    # A step never removes a node, and one it adds it took: with ``touched``, the same count
    # means the same nodes (comparing the keys of 50,000 nodes twice was 4 ms a persist).
    whole = touched is None or len(old.nodes) != len(new.nodes)
    for node in new.nodes.keys() if whole else touched or ():
        progress = new.nodes.get(node)
        if progress is not None and old.nodes.get(node) != progress:
            out.add(page_of[node])
    if whole and old.nodes.keys() != new.nodes.keys():
        out.update(page_of[n] for n in old.nodes.keys() ^ new.nodes.keys() if n in page_of)
    empty: dict[str, RouterStats] = {}
    for w in range(max(len(old.waves), len(new.waves))):
        a = old.waves[w] if w < len(old.waves) else None
        b = new.waves[w] if w < len(new.waves) else None
        if a is None or b is None or a.nodes != b.nodes:
            for wave in (a, b):
                if wave is not None:
                    out.update(page_of[n] for n in wave.nodes if n in page_of)
                    out.update(_changed_stats(wave.baseline, empty, page_of))
                    if wave.evidence_from is not UNSET:
                        out.update(_changed_stats(wave.evidence_from, empty, page_of))
            continue
        if a.baseline != b.baseline:
            out.update(_changed_stats(a.baseline, b.baseline, page_of))
        ea = {} if a.evidence_from is UNSET else a.evidence_from
        eb = {} if b.evidence_from is UNSET else b.evidence_from
        if ea != eb:
            out.update(_changed_stats(ea, eb, page_of))
    return out


def _changed_stats(a: Mapping[str, RouterStats], b: Mapping[str, RouterStats],
                   page_of: Mapping[str, int]) -> set[int]:
    keys = a.keys() | b.keys()
    return {page_of[n] for n in keys if n in page_of and a.get(n) is not b.get(n)}


def fit(record: RolloutRecord, head_size: int, sizes: Mapping[str, int], *, max_payload: int,
        reserve: int, node_reserve: int = 0) -> Layout:
    """The layout of a new rollout's record whose head can reach ``head_size`` bytes (plus
    ``reserve`` for its outbox) and each node ``sizes[node]`` (plus ``node_reserve`` for its
    events in the outbox, kept on its page), on a server taking messages of
    up to ``max_payload`` bytes (0: unknown); UsageError, one line, if it cannot be stored.
    Pages grow past ``PAGE_BYTES`` only when ``MAX_PAGES`` of them would not hold the table."""
    limit = max_payload - 4096 if max_payload else 0  # headers and subject of the message
    n = len(record.nodes)
    if limit and head_size + reserve > limit:
        # A blue-green's report names every node's switch in the head: fewer waves do not help.
        blue_green = "blue-green" in (record.spec.strategy, record.spec.then)
        why = " (a blue-green's report names every node's switch in it)" if blue_green else ""
        fewer = "" if blue_green else "use fewer, larger waves (--batch), "
        raise UsageError(
            f"a rollout of {n} nodes in {len(record.waves)} waves needs a record head of up to "
            f"{_size(head_size + reserve)}{why}, more than the NATS server takes in one message "
            f"(max_payload {_size(max_payload)}); {fewer}roll the fleet out in parts with "
            "--selector, or raise max_payload in the server's configuration")
    if node_reserve:
        sizes = {n: size + node_reserve for n, size in sizes.items()}
    total = sum(sizes.values())
    biggest = max(sizes.values(), default=0)
    # A page is cut before the node that would overfill it, so every page but the last holds
    # more than ``budget - biggest``: this budget makes at most MAX_PAGES of them.
    budget = max(PAGE_BYTES, -(-total // (MAX_PAGES - 1)) + biggest)
    if limit:
        budget = min(budget, limit)
    layout = plan(order(record), sizes.__getitem__, budget)
    if biggest > budget or len(layout.pages) > MAX_PAGES:
        raise UsageError(
            f"a rollout of {n} nodes needs a node table of up to {_size(total)}, more than "
            f"{MAX_PAGES} messages of the NATS server's max_payload ({_size(max_payload)}) "
            "hold; roll the fleet out in parts with "
            "--selector, or raise max_payload in the server's configuration")
    return layout


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
