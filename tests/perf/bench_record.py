"""The rollout record of N nodes as the store writes it (``coordinator.core.pages``), in process:
no server, the real engine and pages code, simulated router snapshots on every node.

Usage: python tests/perf/bench_record.py [--nodes 50000] [--max-payload 1048576] [--json]

Figures: the layout (pages, the largest page, the head) against the record as one value; the
bytes a step writes when a wave starts and when 500 of its nodes report done (JSON, and as
stored: deflated), against the whole
record; the time of each part (planning, a step, finding and encoding the changed pages); the
Python heap the record and its inputs take (tracemalloc, in a second run: it slows what it
traces several times).
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

from coordinator.core import pages
from coordinator.core.engine import ObservedChanged, Rollout, Start, new_record, worst_case_sizes
from protocol.codec import encode
from protocol.history import pack_page
from protocol.messages import NodeView, RolloutRecord
from protocol.testing import NEW, desired, report, router_stats, spec


def written(before: RolloutRecord, after: RolloutRecord,
            layout: pages.Layout) -> tuple[int, int, int]:
    """Pages a persist of ``after`` writes over ``before`` (the head aside), their JSON's bytes
    and the bytes stored (deflated: ``protocol.history.pack_page``)."""
    changed = pages.dirty(before, after, layout)
    where = pages.positions(after.waves)
    bodies = [encode(pages.page(after, layout, k, where)) for k in changed]
    return len(changed), sum(map(len, bodies)), sum(len(pack_page(b)) for b in bodies)


def measure(n: int, max_payload: int) -> dict[str, Any]:
    """Every figure of one run; the heap from a second run under tracemalloc, which would
    slow the timed one several times (session 34 quoted a layout planned in 0.17 s at 10,000
    nodes that takes 0.03 s untraced)."""
    out = run(n, max_payload)
    tracemalloc.start()
    run(n, max_payload)
    out["python_heap_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    return out


def run(n: int, max_payload: int) -> dict[str, Any]:
    views = [NodeView(id=f"sim-{i}", online=True) for i in range(1, n + 1)]
    current = {v.id: desired(v.id) for v in views}
    routers = {v.id: router_stats() for v in views}
    rec = new_record(id="hello-bench", spec=spec(batch="10%", max_unavailable="10%"),
                     release=NEW, nodes=views, current=current, now=1.0)
    out: dict[str, Any] = {"nodes": n, "max_payload": max_payload}
    t = time.perf_counter()
    head, sizes = worst_case_sizes(rec, routers)
    layout = pages.fit(rec, head, sizes, max_payload=max_payload, reserve=512_000)
    out["plan_s"] = round(time.perf_counter() - t, 3)
    top, parts = pages.split(rec, layout)
    encoded = [len(encode(p)) for p in parts]
    out |= {"pages": len(parts), "largest_page_bytes": max(encoded),
            "head_bytes": len(encode(top)), "table_bytes": sum(encoded)}
    rollout = Rollout(rec, fleet="f")
    t = time.perf_counter()
    rollout.handle(Start(), 2.0)
    out["start_step_s"] = round(time.perf_counter() - t, 3)
    started = rollout.record
    t = time.perf_counter()
    (out["wave_start_pages"], out["wave_start_bytes"],
     out["wave_start_stored_bytes"]) = written(rec, started, layout)
    out["wave_start_write_s"] = round(time.perf_counter() - t, 3)
    done = [ObservedChanged(p.node, report(p.target, 3.0)) for p in started.nodes.values()
            if p.target is not None][:500]
    t = time.perf_counter()
    rollout.handle_all(done, 3.0)
    out["done_500_step_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    (out["done_500_pages"], out["done_500_bytes"],
     out["done_500_stored_bytes"]) = written(started, rollout.record, layout)
    out["done_500_write_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    out["one_value_bytes"] = len(encode(rollout.record))
    out["one_value_encode_s"] = round(time.perf_counter() - t, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=50_000)
    ap.add_argument("--max-payload", type=int, default=1 << 20)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    r = measure(args.nodes, args.max_payload)
    emit(args.json, f"the record of a rolling rollout over {r['nodes']} nodes, 10 waves", r, [
        ("layout", f"{r['pages']} pages, largest {r['largest_page_bytes'] / 1e3:.0f} KB, head "
                   f"{r['head_bytes'] / 1e3:.1f} KB (planned in {r['plan_s']:.2f} s)"),
        ("as one value", f"{r['one_value_bytes'] / 1e6:.1f} MB "
                         f"(encoded in {r['one_value_encode_s']:.3f} s)"),
        ("a wave starts", f"{r['wave_start_pages']} pages, {r['wave_start_bytes'] / 1e6:.2f} MB "
                          f"({r['wave_start_stored_bytes'] / 1e6:.2f} MB stored) "
                          f"(step {r['start_step_s']:.3f} s, pages "
                          f"{r['wave_start_write_s']:.3f} s)"),
        ("500 nodes done", f"{r['done_500_pages']} pages, {r['done_500_bytes'] / 1e6:.2f} MB "
                           f"({r['done_500_stored_bytes'] / 1e6:.2f} MB stored) "
                           f"(step {r['done_500_step_s']:.3f} s, pages "
                           f"{r['done_500_write_s']:.3f} s)"),
        ("Python heap", f"{r['python_heap_mb']:.0f} MiB (record, desired states, routers)"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
