"""What the coordinator holds per node, in memory, as decoded and after ``protocol.codec.shared``.

Usage: python tests/perf/bench_shared.py [--nodes 10000] [--json]

The four messages a coordinator keeps one of per node (its registration, its latest heartbeat,
its observed state of a service, its current desired state: a rollout's ``previous``), as the
simulator and a real agent write them (one service, two slots, a 71-character digest each),
encoded once per node and decoded as the coordinator decodes them; tracemalloc counts the bytes
the decoded values hold, per node, then the same with their strings shared (``sys.intern``), and
the microseconds ``shared`` costs a value. No sockets, no server.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import emit

from agent import presence
from agent.host.hostinfo import host_facts
from agent.simulate import instant_observed, summary_of
from protocol.codec import decode, encode, shared
from protocol.messages import DesiredState, Heartbeat, NodeInfo, ObservedState, ReleaseRef

TYPES: tuple[type[Any], ...] = (NodeInfo, Heartbeat, ObservedState, DesiredState)


def payloads(n: int) -> list[tuple[bytes, ...]]:
    facts = host_facts()
    old = ReleaseRef(service="hello", version="1.0.0", digest="sha256:" + "a" * 64, size=1234)
    new = ReleaseRef(service="hello", version="2.0.0", digest="sha256:" + "b" * 64, size=1234)
    out = []
    for i in range(1, n + 1):
        node, now = f"sim-{i}", time.time()
        info = presence.node_info(node=node, labels={"role": "sim", "zone": "a"}, facts=facts,
                                  bind_host="127.0.0.1", started_at=now,
                                  trust_keys={"A" * 56})
        desired = DesiredState(fleet="perf", node=node, service="hello", generation=3,
                               slots={"blue": old, "green": new}, weights={"green": 100},
                               rollout="hello-20261203-063910-e0a6", time=now)
        beat = Heartbeat(node=node, seq=5, time=now, labels={"role": "sim", "zone": "a"},
                         services=[summary_of(desired)])
        out.append((encode(info), encode(beat), encode(instant_observed(node, desired, now)),
                    encode(desired)))
    return out


def held(tp: type[Any], raw: list[bytes], share: bool) -> tuple[float, list[Any]]:
    """Bytes a node that ``raw`` decoded into ``tp`` (shared or not) holds, and the values."""
    before = tracemalloc.get_traced_memory()[0]
    values = [shared(decode(tp, r)) if share else decode(tp, r) for r in raw]
    return (tracemalloc.get_traced_memory()[0] - before) / len(raw), values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    rows = payloads(args.nodes)
    figures: dict[str, Any] = {"nodes": args.nodes}
    table: list[tuple[str, str]] = []
    keep: list[Any] = []  # every decoded value stays alive, as in a coordinator
    tracemalloc.start()
    for k, tp in enumerate(TYPES):
        raw = [r[k] for r in rows]
        plain, values = held(tp, raw, share=False)
        keep.append(values)
        share, values = held(tp, raw, share=True)
        keep.append(values)
        figures[tp.__name__] = {"json_bytes": len(raw[0]), "decoded_bytes": round(plain),
                                "shared_bytes": round(share)}
        table.append((tp.__name__, f"{len(raw[0])} B of JSON: decoded {plain:.0f} B, "
                      f"shared {share:.0f} B ({share / plain:.2f}x)"))
    tracemalloc.stop()
    for k, tp in enumerate(TYPES):
        values = [decode(tp, r[k]) for r in rows]
        started = time.perf_counter()
        for v in values:
            shared(v)
        us = (time.perf_counter() - started) / len(values) * 1e6
        figures[tp.__name__]["shared_us"] = round(us, 2)
        table[k] = (table[k][0], f"{table[k][1]}; shared() {us:.1f} us a value")
    total = sum(f["decoded_bytes"] for f in figures.values() if isinstance(f, dict))
    total_shared = sum(f["shared_bytes"] for f in figures.values() if isinstance(f, dict))
    figures.update(total_bytes=total, total_shared_bytes=total_shared)
    table.append(("all four", f"{total} B a node decoded, {total_shared} B shared: "
                  f"{(total - total_shared) * 50_000 / 2**20:.0f} MiB less at 50,000 nodes"))
    emit(args.json, f"per-node messages held by a coordinator, {args.nodes} nodes", figures,
         table)


if __name__ == "__main__":
    main()
